"""A reviewer's attacks on remote directories (issue 12), each a case that once went wrong: names
an index gives its shards that a URL reads as something else, outputs next to their inputs,
dry runs that write, and torchrun's gating of misconfigured environments.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import test_remote
import torch
from safetensors.torch import save

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

s3_endpoint = test_remote.s3_endpoint
bucket = test_remote.bucket
http_store = test_remote.http_store
store = test_remote.store
one_line_error = test_remote.one_line_error


@pytest.fixture(scope="module", autouse=True)
def _clients_of_this_server(s3_endpoint: str) -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def _index(shard: str) -> bytes:
    return json.dumps({"weight_map": {"w": shard}}).encode()


SHARD = save({"w": torch.zeros(2)})


@pytest.mark.parametrize(
    "name",
    [
        "%2e%2e/secret.safetensors",  # the client decodes it to `..`: the server's /secret.safetensors
        ".%2E/secret.safetensors",
        "a#x.safetensors",  # a fragment: the object `a`, not the one named
        "a?x.safetensors",  # a query string on the object `a`
    ],
)
def test_an_https_index_naming_shards_a_url_reads_otherwise_is_refused(cli, store, name):
    store.objects["/secret.safetensors"] = store.objects["/hub/a"] = SHARD
    store.objects["/hub/model.safetensors.index.json"] = _index(name)
    r = cli("inspect", f"{store.url}/hub/model.safetensors.index.json")
    assert r.exit_code == 2
    assert repr(name) in one_line_error(r)
    assert store.served == len(_index(name))  # the index, and no shard


def test_an_s3_index_naming_a_chained_url_is_refused(cli, bucket):
    """fsspec reads `A::B` as a chain: the shard `ab::s3://other/x` was the object `ab` of the
    index's directory, opened with options for another store (here: a TypeError from aiobotocore)."""
    name, fs = bucket
    fs.pipe(f"{name}/m/ab", SHARD)
    shard = "ab::s3://other/x.safetensors"
    fs.pipe(f"{name}/m/model.safetensors.index.json", _index(shard))
    r = cli("inspect", f"s3://{name}/m/model.safetensors.index.json")
    assert r.exit_code == 2
    assert repr(shard) in one_line_error(r)
