"""The one model cache of a process (heartbatch.model): the API, the client and the workers
share a loaded model while its file is unchanged, and a long-lived process keeps only a few."""

from __future__ import annotations

import os

import onnx_models as M

from heartbatch import model as model_module
from heartbatch.model import BoxModel, ModelRef, remember, shared_model, worker_model


def test_shared_model_is_loaded_once_while_the_file_is_unchanged(tmp_path):
    path = M.constant_box_model(tmp_path / "m.onnx")
    first = shared_model(path)
    assert shared_model(path) is first
    assert shared_model(str(path)) is first  # however the path is spelled
    M.constant_box_model(path, boxes=[0.3, 0.3, 0.6, 0.6, 0.1, 0.1, 0.9, 0.9])  # a new file in its place
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = shared_model(path)
    assert second is not first
    assert second.info.model_id != first.info.model_id


def test_a_remembered_model_is_what_workers_in_this_process_get(tmp_path):
    loaded = BoxModel(M.constant_box_model(tmp_path / "m.onnx"), threads=1)
    ref = remember(loaded)
    assert isinstance(ref, ModelRef)
    assert worker_model(ref) is loaded


def test_the_cache_keeps_only_the_most_recently_used_models(tmp_path):
    size = model_module._LOADED.size
    paths = [M.constant_box_model(tmp_path / f"m{i}.onnx", boxes=[0.1 + i / 100, 0.2, 0.6, 0.7] * 2)
             for i in range(size + 2)]
    models = [shared_model(p) for p in paths]
    assert len(model_module._LOADED.models) <= size
    assert shared_model(paths[-1]) is models[-1]   # recent: kept
    assert shared_model(paths[0]) is not models[0]  # oldest: evicted, loaded again
