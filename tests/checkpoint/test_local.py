"""cptrain.checkpoint.local: atomic, verifiable single-process checkpoints, finding the newest
intact one, pruning, repair of interrupted re-saves and the pickle-free optimizer format."""

import copy
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import flip
from safetensors import safe_open

from cptrain import fsutil
from cptrain.checkpoint import local
from cptrain.errors import CheckpointError, EnvironmentProblem
from cptrain.models.build import build_model


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A nano Llama after one AdamW step: the optimizer has per-parameter state."""
    model = build_model("nano", 64, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    ids = torch.arange(16).reshape(2, 8)
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def save(root: Path, step: int, trained, *, keep_last: int = 100, **kw: Any) -> Path:
    model, opt = trained
    kw.setdefault("state", {"trainer": {"step": step}})
    return local.save_checkpoint(
        root, step, model=model, tokenizer_dir=None, optimizer=opt, keep_last=keep_last, **kw
    )


def steps(root: Path) -> list[int]:
    return [s for s, _ in local.list_checkpoints(root)]


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def reseal(path: Path, step: int) -> None:
    """Write the manifest again after editing a checkpoint (the edit then passes verify)."""
    (path / "MANIFEST.json").unlink()
    local.seal(path, step)


def assert_same(a: Any, b: Any) -> None:
    """Equal values of the same types all the way down (tuples stay tuples, tensors equal)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------------ save and load
def test_save_then_load_round_trips_every_part(tmp_path, trained):
    model, opt = trained
    anchor = {"w": torch.randn(3, 4), "n": torch.tensor(7)}
    component = {"anchor": anchor, "pair": (1, 2.5), "names": ["a", "b"], "k": 3}
    plain, tensors = local.split_state(component, "reptile")
    rng = torch.get_rng_state()
    path = save(
        tmp_path, 3, trained, state={"trainer": {"tokens": 5}, "reptile": plain},
        tensors={"reptile": tensors},
    )
    assert path == tmp_path / "step_000000003"
    assert names(tmp_path) == ["step_000000003"]  # no temporary directory left behind
    assert local.verify(path) is None

    c = local.load_checkpoint(path)
    assert c.step == 3 and c.state["format"] == local.FORMAT
    assert c.state["trainer"] == {"tokens": 5}
    assert_same(c.component("reptile"), component)
    assert c.component("absent") is None
    assert c.tensors("absent") is None
    assert_same(c.model_state(), {k: v.detach() for k, v in model.state_dict().items()})
    blob = c.optimizer_blob()
    assert_same(blob["optimizer"], opt.state_dict())
    assert torch.equal(blob["rng_cpu"], rng)


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path, trained):
    path = save(tmp_path, 1, trained, tensors={"anchor": {"w": torch.ones(2)}})
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["format"] == local.FORMAT and manifest["step"] == 1
    files = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == files - {"MANIFEST.json"}
    assert {"state.json", local.OPTIMIZER_FILE, "model/model.safetensors",
            "tensors/anchor.safetensors"} <= files
    for rel, entry in manifest["files"].items():
        assert entry == {"bytes": (path / rel).stat().st_size,
                         "sha256": fsutil.sha256_file(path / rel)}


# ------------------------------------------------------------------------- verification
def test_a_flipped_byte_is_reported_by_the_full_check_only(tmp_path, trained):
    path = save(tmp_path, 1, trained)
    flip(path / "model" / "model.safetensors")
    assert local.verify(path) == "model/model.safetensors fails its sha256 check"
    assert local.verify(path, full=False) is None  # the cheap check compares sizes only
    with pytest.raises(CheckpointError, match="is damaged: model/model.safetensors fails"):
        local.load_checkpoint(path)


def _unlink_optimizer(path: Path) -> None:
    (path / local.OPTIMIZER_FILE).unlink()


def _truncate_state(path: Path) -> None:
    f = path / "state.json"
    f.write_bytes(f.read_bytes()[:-3])


def _remove_manifest(path: Path) -> None:
    (path / "MANIFEST.json").unlink()


def _garble_manifest(path: Path) -> None:
    (path / "MANIFEST.json").write_text('{"files": ')


def _manifest_without_files(path: Path) -> None:
    (path / "MANIFEST.json").write_text('{"step": 4, "files": [1, 2]}')


def _edit_manifest(path: Path, edit) -> None:
    mf = path / "MANIFEST.json"
    manifest = json.loads(mf.read_text())
    edit(manifest["files"])
    mf.write_text(json.dumps(manifest))


def _unlist_optimizer(path: Path) -> None:
    _edit_manifest(path, lambda files: files.pop(local.OPTIMIZER_FILE))


def _unlist_weights(path: Path) -> None:
    _edit_manifest(path, lambda files: files.pop("model/model.safetensors"))


def _list_outside(path: Path) -> None:
    (path.parent / "outside").write_bytes(b"x")
    entry = {"bytes": 1, "sha256": fsutil.sha256_file(path.parent / "outside")}
    _edit_manifest(path, lambda files: files.update({"../outside": entry}))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_unlink_optimizer, "missing file optimizer.safetensors"),
        (_truncate_state, "state.json has {n} bytes, expected {m}"),
        (_remove_manifest, "no MANIFEST.json (incomplete write)"),
        (_garble_manifest, "MANIFEST.json is damaged"),
        (_manifest_without_files, "MANIFEST.json is damaged"),
        (_unlist_optimizer, "MANIFEST.json does not list optimizer.safetensors"),
        (_unlist_weights, "MANIFEST.json does not list model/*.safetensors"),
        (_list_outside, "MANIFEST.json names a file outside the checkpoint (../outside)"),
    ],
)
def test_verify_reports_each_kind_of_damage(tmp_path, trained, damage, reason):
    path = save(tmp_path, 4, trained)
    size = (path / "state.json").stat().st_size
    damage(path)
    expected = reason.format(n=size - 3, m=size)
    assert local.verify(path) == expected
    assert local.verify(path, full=False) == expected  # none of these needs a hash
    assert local.latest_complete(tmp_path) == (None, [f"step_000000004: {expected}"])
    with pytest.raises(CheckpointError, match="damaged"):
        local.load_checkpoint(path)


def test_verify_refuses_a_manifest_of_another_step(tmp_path, trained):
    path = save(tmp_path, 5, trained)
    moved = path.rename(tmp_path / "step_000000006")
    assert local.verify(moved) == "MANIFEST.json is for step 5, not 6"


def test_load_checkpoint_refuses_a_state_of_another_format(tmp_path, trained):
    path = save(tmp_path, 1, trained)
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "format": "other-v9"}))
    reseal(path, 1)
    with pytest.raises(CheckpointError, match="unknown format 'other-v9'"):
        local.load_checkpoint(path)
    (path / "state.json").write_text("[1, 2]")
    reseal(path, 1)
    with pytest.raises(CheckpointError, match="state.json is not a checkpoint state"):
        local.load_checkpoint(path)


# ------------------------------------------------------------------- the newest intact one
def test_latest_complete_picks_the_newest_intact_one_and_lists_the_skipped(tmp_path, trained):
    for s in (1, 2, 3):
        save(tmp_path, s, trained)
    flip(tmp_path / "step_000000003" / local.OPTIMIZER_FILE)
    (tmp_path / "step_000000002" / "MANIFEST.json").unlink()
    (tmp_path / "step_000000009").write_text("a file, not a checkpoint")
    (tmp_path / "other").mkdir()

    path, skipped = local.latest_complete(tmp_path)
    assert path == tmp_path / "step_000000001"
    assert skipped == [
        "step_000000003: optimizer.safetensors fails its sha256 check",
        "step_000000002: no MANIFEST.json (incomplete write)",
    ]
    # the cheap check does not see a flipped byte
    assert local.latest_complete(tmp_path, full=False) == (tmp_path / "step_000000003", [])


def test_latest_complete_orders_by_step_number(tmp_path, trained):
    save(tmp_path, 10, trained)
    old = save(tmp_path, 9, trained)  # written later, but an older step
    os.utime(old)
    assert local.latest_complete(tmp_path) == (tmp_path / "step_000000010", [])


def test_latest_complete_without_any(tmp_path, trained):
    assert local.latest_complete(tmp_path / "missing") == (None, [])
    assert local.latest_complete(tmp_path) == (None, [])
    path = save(tmp_path, 1, trained)
    flip(path / "state.json")
    assert local.latest_complete(tmp_path) == (
        None, ["step_000000001: state.json fails its sha256 check"]
    )


# -------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize(
    ("keep_last", "left"), [(0, [5]), (1, [5]), (2, [4, 5]), (7, [1, 2, 3, 4, 5])]
)
def test_prune_keeps_exactly_keep_last(tmp_path, trained, keep_last, left):
    for s in range(1, 6):
        save(tmp_path, s, trained)
    local.prune(tmp_path, keep_last)
    assert steps(tmp_path) == left


def test_saving_prunes_to_keep_last(tmp_path, trained):
    for s in range(1, 6):
        save(tmp_path, s, trained, keep_last=2)
    assert steps(tmp_path) == [4, 5]
    assert names(tmp_path) == ["step_000000004", "step_000000005"]


def test_prune_never_deletes_or_counts_damaged_checkpoints(tmp_path, trained):
    for s in range(1, 7):
        save(tmp_path, s, trained)
    (tmp_path / "step_000000006" / "MANIFEST.json").unlink()  # an incomplete newest one
    _truncate_state(tmp_path / "step_000000005")
    _unlink_optimizer(tmp_path / "step_000000002")  # damaged, older than the kept ones
    local.prune(tmp_path, 2)
    assert steps(tmp_path) == [2, 3, 4, 5, 6]  # only the intact step 1 went
    intact = [s for s, p in local.list_checkpoints(tmp_path) if local.verify(p) is None]
    assert intact == [3, 4]


def test_prune_never_leaves_only_damaged_checkpoints(tmp_path, trained):
    for s in (1, 2, 3):
        save(tmp_path, s, trained)
    # same sizes: only a full sha256 check tells these two from intact ones
    flip(tmp_path / "step_000000003" / "model" / "model.safetensors")
    flip(tmp_path / "step_000000002" / "state.json")
    local.prune(tmp_path, 1)
    assert steps(tmp_path) == [1, 2, 3]
    assert local.latest_complete(tmp_path)[0] == tmp_path / "step_000000001"


def test_prune_deletes_nothing_when_nothing_is_intact(tmp_path, trained):
    for s in (1, 2):
        save(tmp_path, s, trained)
        flip(tmp_path / f"step_00000000{s}" / "state.json")
    local.prune(tmp_path, 1)
    assert steps(tmp_path) == [1, 2]


def test_prune_keeps_the_protected_checkpoint(tmp_path, trained):
    for s in (1, 2, 3):
        save(tmp_path, s, trained)
    local.prune(tmp_path, 1, protect=tmp_path / "step_000000002")
    # kept: the protected one; deleted: only intact ones older than every kept one
    assert steps(tmp_path) == [2, 3]


def test_prune_removes_the_leftovers_of_interrupted_saves(tmp_path, trained):
    for s in (1, 2):
        save(tmp_path, s, trained)
    tmp = tmp_path / ".tmp-step_000000003-4242"
    aside = tmp_path / ".old-step_000000002-4242"  # step 2 is in place: a finished re-save
    for d in (tmp, aside):
        (d / "model").mkdir(parents=True)
        (d / "model" / "half.safetensors").write_bytes(b"xx")
    (tmp_path / ".unrelated").mkdir()
    (tmp_path / "notes.txt").write_text("mine")

    assert local.leftovers(tmp_path) == [aside, tmp]
    assert local.interrupted_resaves(tmp_path) == []
    local.prune(tmp_path, 5)
    assert names(tmp_path) == [".unrelated", "notes.txt", "step_000000001", "step_000000002"]
    assert local.leftovers(tmp_path / "missing") == []


# ------------------------------------------------------------ interrupted re-save repaired
def _kill_resave(root: Path, step: int) -> Path:
    """What a re-save of ``step`` killed between its two renames leaves: the old copy moved
    aside, the new one still under its temporary name."""
    aside = root / f".old-step_{step:09d}-999"
    (root / f"step_{step:09d}").rename(aside)
    (root / f".tmp-step_{step:09d}-999").mkdir()
    return aside


def test_latest_complete_puts_back_a_copy_an_interrupted_resave_moved_aside(tmp_path, trained):
    save(tmp_path, 1, trained)
    save(tmp_path, 2, trained)
    aside = _kill_resave(tmp_path, 2)
    assert local.interrupted_resaves(tmp_path) == [(2, aside)]
    assert local.latest_complete(tmp_path, repair=False) == (tmp_path / "step_000000001", [])
    assert steps(tmp_path) == [1]  # repair=False changes nothing

    assert local.latest_complete(tmp_path) == (tmp_path / "step_000000002", [])
    assert steps(tmp_path) == [1, 2] and not aside.exists()
    assert local.verify(tmp_path / "step_000000002") is None


def test_prune_repairs_before_it_deletes(tmp_path, trained):
    save(tmp_path, 1, trained)
    save(tmp_path, 2, trained)
    _kill_resave(tmp_path, 2)
    local.prune(tmp_path, 1)
    # the moved-aside copy was the newest intact checkpoint: put back and kept, not deleted
    assert names(tmp_path) == ["step_000000002"]
    assert local.verify(tmp_path / "step_000000002") is None


def test_a_damaged_copy_moved_aside_is_not_put_back(tmp_path, trained):
    save(tmp_path, 1, trained)
    save(tmp_path, 2, trained)
    aside = _kill_resave(tmp_path, 2)
    (aside / "MANIFEST.json").unlink()
    assert local.latest_complete(tmp_path) == (tmp_path / "step_000000001", [])
    assert aside.exists() and steps(tmp_path) == [1]


def test_resaving_a_step_replaces_a_damaged_copy(tmp_path, trained):
    save(tmp_path, 1, trained)
    path = save(tmp_path, 2, trained)
    flip(path / "model" / "model.safetensors")
    assert save(tmp_path, 2, trained) == path
    assert local.verify(path) is None
    assert names(tmp_path) == ["step_000000001", "step_000000002"]  # nothing left aside


# ------------------------------------------------------------------------------ disk full
def _disk_full(monkeypatch: pytest.MonkeyPatch, code: int = errno.ENOSPC) -> None:
    def write(fd: int, data) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fsutil, "_write", write)


def test_a_full_disk_leaves_the_older_checkpoints_and_says_which_is_intact(
    tmp_path, trained, monkeypatch
):
    save(tmp_path, 1, trained)
    _disk_full(monkeypatch)
    with pytest.raises(EnvironmentProblem) as info:
        save(tmp_path, 2, trained, keep_last=1)
    message = str(info.value)
    assert message.startswith(
        f"disk full while writing checkpoint {tmp_path / 'step_000000002'} "
        f"({os.strerror(errno.ENOSPC)}); free space, then resume with --resume"
    )
    assert "(the newest complete one, step_000000001, is intact)" in message
    assert names(tmp_path) == ["step_000000001"]
    assert local.verify(tmp_path / "step_000000001") is None


def test_a_full_disk_without_any_complete_checkpoint(tmp_path, trained, monkeypatch):
    _disk_full(monkeypatch, errno.EDQUOT)
    with pytest.raises(EnvironmentProblem, match=r"\(none is complete\)"):
        save(tmp_path, 1, trained)
    assert names(tmp_path) == []


def test_other_write_errors_propagate_and_leave_no_temporary_directory(
    tmp_path, trained, monkeypatch
):
    _disk_full(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as info:
        save(tmp_path, 1, trained)
    assert info.value.errno == errno.EIO and not isinstance(info.value, EnvironmentProblem)
    assert names(tmp_path) == []


# ------------------------------------------------------------------ optimizer without pickle
def test_pack_unpack_optimizer_round_trip(trained):
    _, opt = trained
    state = opt.state_dict()
    rng = torch.get_rng_state()
    data = local.pack_optimizer(state, rng)
    meta = local._metadata_of(data)[local._META_KEY]
    back = local.unpack_optimizer(data, meta)
    assert_same(back["optimizer"], state)  # int param ids, tuple betas, tensor steps
    assert isinstance(back["optimizer"]["param_groups"][0]["betas"], tuple)
    assert torch.equal(back["rng_cpu"], rng)


def test_packed_optimizer_is_a_plain_safetensors_file(tmp_path, trained):
    _, opt = trained
    f = tmp_path / "opt.safetensors"
    f.write_bytes(local.pack_optimizer(opt.state_dict(), torch.get_rng_state()))
    with safe_open(str(f), framework="pt") as st:
        keys = set(st.keys())
        meta = json.loads(st.metadata()[local._META_KEY])
    assert "rng_cpu" in keys and "state/0/exp_avg" in keys
    assert meta["state"]["0"]["exp_avg"] == {"__tensor__": "state/0/exp_avg"}
    assert meta["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.95]}


def test_an_unpacked_optimizer_steps_exactly_like_the_original(trained):
    model, opt = trained
    data = local.pack_optimizer(opt.state_dict(), torch.get_rng_state())
    unpacked = local.unpack_optimizer(data, local._metadata_of(data)[local._META_KEY])

    def one_step(optimizer_state: dict[str, Any]) -> dict[str, torch.Tensor]:
        m = build_model("nano", 64, seed=1)
        m.load_state_dict(model.state_dict())
        o = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95))
        o.load_state_dict(copy.deepcopy(optimizer_state))
        ids = torch.arange(8).reshape(1, 8)
        m(ids, labels=ids).loss.backward()
        o.step()
        return m.state_dict()

    assert_same(one_step(unpacked["optimizer"]), one_step(opt.state_dict()))


def test_a_legacy_optimizer_pt_is_still_read(tmp_path, trained):
    _, opt = trained
    path = save(tmp_path, 1, trained)
    (path / local.OPTIMIZER_FILE).unlink()
    rng = torch.get_rng_state()
    torch.save({"optimizer": opt.state_dict(), "rng_cpu": rng}, path / local.LEGACY_OPTIMIZER_FILE)
    reseal(path, 1)
    assert local.verify(path) is None
    blob = local.load_checkpoint(path).optimizer_blob()
    assert_same(blob["optimizer"], opt.state_dict())
    assert torch.equal(blob["rng_cpu"], rng)


def test_an_undecodable_optimizer_file_is_a_checkpoint_error(tmp_path, trained):
    path = save(tmp_path, 1, trained)
    (path / local.OPTIMIZER_FILE).write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
    reseal(path, 1)  # intact as far as the manifest knows
    with pytest.raises(CheckpointError, match="optimizer.safetensors: unreadable"):
        local.load_checkpoint(path).optimizer_blob()


def test_join_state_without_its_tensor_is_a_checkpoint_error():
    plain, tensors = local.split_state({"w": torch.ones(2), "t": (torch.zeros(1),)}, "anchor")
    assert plain == {"w": {"__tensor__": "anchor/w"},
                     "t": {"__tuple__": [{"__tensor__": "anchor/t/0"}]}}
    assert set(tensors) == {"anchor/w", "anchor/t/0"}
    with pytest.raises(CheckpointError, match="lacks tensor 'anchor/t/0'"):
        local.join_state(plain, {"anchor/w": tensors["anchor/w"]})


def test_model_state_without_weights_is_a_checkpoint_error(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        local.Checkpoint(path=tmp_path, step=0, state={}).model_state()
