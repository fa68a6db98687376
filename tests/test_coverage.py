"""Coverage you can see (symmetry/coverage.py, SymmetrySet.meta["coverage"]): the parameter entries in groups, the ops
that blocked the rest (unsupported ops told from known barriers), in `.details()`, `nmech symmetries` (table, --json,
--json-full), `nmech check` and the HTML report; and a failed capture that prints a clean error, without torch's
fake-tensor log lines.

Counts are derived by hand in each test; `covered_entries` is compared with a brute-force union of member masks.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import neural_mechanics as nm
from neural_mechanics.symmetry.coverage import covered_entries, empty_message
from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet
from neural_mechanics.symmetry.utils import TRACING_LOGGERS, quiet_logs
from test_cli import run  # `nmech ARGS` in-process -> (exit code, stdout, stderr); capfd works as capsys

torch.set_num_threads(1)


@torch.library.custom_op("nmtest_cov::act", mutates_args=())
def unknown_act(x: torch.Tensor) -> torch.Tensor:
    """An activation the engine has no rule for (a ReLU, as it happens)."""
    return torch.relu(x)


@unknown_act.register_fake
def _(x):
    return torch.empty_like(x)


class GeluNet(nn.Module):
    """Linear(4, 8) -> GELU -> Linear(8, 8) -> ReLU -> Linear(8, 3).

    By hand: GELU blocks the first layer's units (a known barrier); the 8 ReLU units are rescale groups (l2 row c
    and bias c in, l3 column c out); the softmax gives 8 column translations and the bias. In groups: l2 (64 + 8)
    and l3 (24 + 3) = 99 of 40 + 72 + 27 = 139 entries.
    """

    input_shape = (4,)

    def __init__(self, act: str = "gelu"):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = act

    def forward(self, x):
        h = F.gelu(self.l1(x)) if self.act == "gelu" else unknown_act(self.l1(x))
        return self.l3(F.relu(self.l2(h)))


class UnknownOnly(nn.Module):
    """Linear(4, 6) -> nmtest_cov::act -> outputs (loss mse): the unknown op blocks the only channels there are."""

    input_shape = (4,)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(4, 6)

    def forward(self, x):
        return unknown_act(self.l1(x))


def make_unknown_only(num_classes: int = 6) -> nn.Module:
    return UnknownOnly()


def make_gelu_net(num_classes: int = 3) -> nn.Module:
    return GeluNet()


X = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))


def test_coverage_of_a_known_barrier():
    found = nm.find_symmetries(GeluNet(), X)
    assert found.counts() == {"translation": 9, "scale": 0, "rescale": 8}
    cov = found.meta["coverage"]
    assert (cov["params_in_groups"], cov["params_total"]) == (99, 139)
    assert cov["param_fraction"] == pytest.approx(99 / 139)
    assert cov["unsupported_ops"] == []
    assert cov["blocked_ops"]["aten.gelu"] == 1
    assert "not positively homogeneous" in cov["barrier_ops"]["aten.gelu"]
    text = found.details()
    assert "99 of 139 parameter entries (71.2%)" in text and "aten.gelu x1" in text and "unsupported" not in text


def test_coverage_of_an_unsupported_op_points_to_register_op():
    found = nm.find_symmetries(GeluNet("unknown"), X)
    cov = found.meta["coverage"]
    assert cov["unsupported_ops"] == ["nmtest_cov.act"] and "nmtest_cov.act" not in cov["barrier_ops"]
    text = found.details()
    assert "unsupported" in text and "nm.register_op" in text and "docs/extending.md" in text
    with nm.register_op(unknown_act, "pass_through"):  # taught: the first layer's 8 units become rescale groups
        taught = nm.find_symmetries(GeluNet("unknown"), X)
    assert taught.counts()["rescale"] == 16 and taught.meta["coverage"]["unsupported_ops"] == []
    assert taught.meta["coverage"]["params_in_groups"] == 139


def test_no_group_because_of_an_unsupported_op_is_never_no_symmetry():
    found = nm.find_symmetries(UnknownOnly(), X, loss="mse")
    assert len(found) == 0 and found.meta["coverage"]["params_in_groups"] == 0
    for text in (found.details(), empty_message(found.meta)):
        assert "No symmetry found" not in text
        assert "does NOT mean the model has no symmetry" in text and "nmtest_cov.act" in text
    # a model whose channels are all stopped by known barriers may say so
    tanh = nm.find_symmetries(nn.Sequential(nn.Linear(4, 3), nn.Tanh()), X, loss="mse")
    assert len(tanh) == 0 and empty_message(tanh.meta).startswith("No symmetry found") and "aten.tanh" in tanh.details()


class Recurrent(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = getattr(nn, kind)(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("kind,op", [("LSTM", "aten.lstm"), ("GRU", "aten.gru"), ("RNN", "aten.rnn_tanh")])
def test_recurrent_layers_are_named_barriers(kind, op):
    """The fused recurrent op blocks its output; what survives is the head's softmax translation (6 columns + bias)."""
    found = nm.find_symmetries(Recurrent(kind), torch.randn(2, 5, 4))
    assert found.counts() == {"translation": 7, "scale": 0, "rescale": 0}
    cov = found.meta["coverage"]
    assert op in cov["barrier_ops"] and "recurrent" in cov["barrier_ops"][op] and cov["unsupported_ops"] == []


def test_eval_mode_batchnorm_is_a_known_barrier_with_its_reason():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    cov = nm.find_symmetries(model, X).meta["coverage"]
    key = "aten.batch_norm (eval mode: running statistics)"
    assert cov["blocked_ops"][key] == 1 and "eval mode" in cov["barrier_ops"][key]


# ---- counting covered entries ------------------------------------------------------------------------------------


def _brute_force(groups, shapes):
    masks = {k: torch.zeros(s, dtype=torch.bool) for k, s in shapes.items()}
    for g in groups:
        for m in g.members:
            masks[m.param] |= m.mask(masks[m.param])
    return {k: int(v.sum()) for k, v in masks.items() if v.any()}


def test_covered_entries_by_hand():
    shapes = {"w": (6, 4, 3), "b": (6,), "g": (8, 2, 3, 3)}
    groups = [
        Symmetry("scale", "a", (Member("w", 0, (1, 2)), Member("b", 0, (1,)))),
        Symmetry("translation", "c", (Member("w", -2, (0,)),)),  # dim -2 = 1: overlaps rows 1-2 in 2 x 3 entries
        Symmetry("scale", "d", (Member("g", 0, (0, 1), None, 1, (1,)), Member("g", 0, (4,), None, 0, (4, 5)))),
    ]
    # w: rows 1, 2 (2 x 12) + column 0 (6 x 3) - both (2 x 3) = 36; b: 1; g: 2 x 9 + 1 x 18 = 36
    assert covered_entries(groups, shapes) == {"w": 36, "b": 1, "g": 36} == _brute_force(groups, shapes)
    # a block member along one dim whose two index sets do not meet covers nothing (the parameter is left out)
    disjoint = [Symmetry("scale", "e", (Member("p", 0, (0,), None, 0, (1,)),))]
    assert covered_entries(disjoint, {"p": (2, 1)}) == {} == _brute_force(disjoint, {"p": (2, 1)})


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_covered_entries_equals_the_union_of_member_masks(data):
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    members = []
    for _ in range(data.draw(st.integers(1, 5))):
        if data.draw(st.booleans()) and len(members) > 0 and data.draw(st.booleans()):
            members.append(Member("p"))
            continue
        dim = data.draw(st.integers(0, len(shape) - 1))
        index = tuple(data.draw(st.lists(st.integers(0, shape[dim] - 1), min_size=1, max_size=3)))
        if len(shape) > 1 and data.draw(st.booleans()):
            sub = data.draw(st.integers(0, len(shape) - 1))
            sub_index = tuple(data.draw(st.lists(st.integers(0, shape[sub] - 1), min_size=1, max_size=3)))
            members.append(Member("p", dim - len(shape) * data.draw(st.booleans()), index, None, sub, sub_index))
        else:
            members.append(Member("p", dim, index))
    groups = [Symmetry("scale", f"s{i}", (m,)) for i, m in enumerate(members)]
    assert covered_entries(groups, {"p": shape}) == _brute_force(groups, {"p": shape})


# ---- JSON, command line, report ------------------------------------------------------------------------------------


def test_json_keeps_the_list_and_the_full_form_carries_the_meta():
    found = nm.find_symmetries(GeluNet(), X)
    assert isinstance(json.loads(found.to_json()), list)
    full = json.loads(found.to_json(with_meta=True))
    assert set(full) == {"symmetries", "meta"} and full["meta"]["coverage"]["params_in_groups"] == 99
    back = SymmetrySet.from_json(found.to_json(with_meta=True))
    assert [g.name for g in back] == [g.name for g in found] and back.meta["coverage"] == found.meta["coverage"]


def test_cli_prints_the_coverage_block_and_the_full_json(monkeypatch, capfd):
    code, out, _ = run(monkeypatch, capfd, "symmetries", "test_coverage:make_gelu_net", "--no-certify")
    assert code == 0 and "coverage: 99 of 139 parameter entries (71.2%)" in out and "aten.gelu x1" in out
    assert "loss: cross_entropy: softmax over axis 1 of output" in out
    code, out, _ = run(monkeypatch, capfd, "symmetries", "test_coverage:make_gelu_net", "--json")
    assert isinstance(json.loads(out), list)  # the public contract: a bare list
    code, out, _ = run(monkeypatch, capfd, "symmetries", "test_coverage:make_gelu_net", "--json-full")
    data = json.loads(out)
    assert data["meta"]["coverage"]["barrier_ops"]["aten.gelu"] and len(data["symmetries"]) == 17


def test_cli_never_says_no_symmetry_when_an_unsupported_op_blocked(monkeypatch, capfd):
    for command in ("symmetries", "check"):
        code, out, _ = run(monkeypatch, capfd, command, "test_coverage:make_unknown_only", "--loss", "mse") \
            if command == "symmetries" else run(monkeypatch, capfd, command, "test_coverage:make_unknown_only")
        assert code == 0, out
        assert "No symmetry found" not in out and "nmtest_cov.act" in out and "register_op" in out, out
        assert "docs/extending.md" in out


def test_a_failed_capture_prints_a_clean_error_without_fake_tensor_logs(monkeypatch, capfd):
    """mlp-bn fed 5 features: the fake-tensor trace fails at the first Linear's matmul (torch logs the traceback at
    ERROR level there), then the eager check reports the shape. Only the clean error may reach the terminal."""
    levels = {name: logging.getLogger(name).level for name in TRACING_LOGGERS}
    records = _Records()
    torch_log = logging.getLogger("torch._subclasses.fake_tensor")  # it has its own handler and does not propagate
    torch_log.addHandler(records)
    try:
        code, out, err = run(monkeypatch, capfd, "symmetries", "mlp-bn", "--input-shape", "5")
        assert records.seen == []  # nothing was logged while capturing
        assert code == 2 and "error:" in err and "what to do" in err and "shape" in err
        assert "fake_tensor" not in err + out and "Traceback" not in err + out and "meta for" not in err + out
        assert {name: logging.getLogger(name).level for name in TRACING_LOGGERS} == levels  # restored
        with pytest.raises(nm.NMechError):  # the same failure outside quiet_logs does log (what was silenced)
            _failing_fake_trace()
        assert any("fake_tensor" in r.name for r in records.seen)
    finally:
        torch_log.removeHandler(records)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen: list[logging.LogRecord] = []

    def emit(self, record):
        self.seen.append(record)


def _failing_fake_trace():
    """The fake-tensor trace capture tries first, on inputs that do not fit, without quiet_logs around it."""
    from neural_mechanics.symmetry.capture import _make_fx

    model = nn.Linear(4, 3)

    def f(params, buffers, x):
        return torch.func.functional_call(model, dict(zip(["weight", "bias"], params, strict=True)), (x,))

    try:
        _make_fx(f, [p.detach() for p in model.parameters()], [], (torch.randn(2, 5),), "fake")
    except Exception as e:
        raise nm.NMechError("fake trace failed as intended") from e


def test_quiet_logs_silences_and_restores(caplog):
    log = logging.getLogger("torch._subclasses.fake_tensor")
    before = log.level
    with caplog.at_level(logging.DEBUG), quiet_logs():
        log.error("hidden")
    assert "hidden" not in caplog.text and log.level == before
    with caplog.at_level(logging.DEBUG):
        log.error("shown")
    assert "shown" in caplog.text


def test_report_shows_the_coverage(tmp_path):
    from neural_mechanics.plots.report import report_html
    from neural_mechanics.tracking.store import RunWriter, open_run

    found = nm.find_symmetries(GeluNet("unknown"), X)
    writer = RunWriter(tmp_path / "r", symmetries=found)
    writer.set_status("complete")
    run_ = open_run(tmp_path / "r")
    assert run_.symmetries.meta["coverage"] == json.loads(json.dumps(found.meta["coverage"]))

    class Live:
        symmetries = found

        def frame(self):
            return run_.frame()

    for source in (tmp_path / "r", Live()):
        text = report_html(source)
        assert "<h3>Coverage</h3>" in text and "of 139 parameter entries" in text
        assert "nmtest_cov.act" in text and "unsupported" in text and "nm.register_op" in text
