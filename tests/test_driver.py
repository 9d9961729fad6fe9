"""The pass driver (named passes, invariants, dumps), the error builder, and errors a user must never see as
an AssertionError."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bkcompile.passes.clip import _lift
from bkcompile.passes.decompose import inline_decompositions
from bkcompile.passes.driver import Pass, run_passes
from bkcompile.passes.emit import Emitter
from joint_graphs import capture
from torch._decomp import get_decompositions
from torch._subclasses.fake_tensor import FakeTensorMode

from bkcompile.errors import NotSupportedYetError, PassInvariantError, PrivacyError, node_error

aten = torch.ops.aten


def _mlp_joint():
    def fn(w, x):
        return F.linear(x, w).tanh().sum()

    return capture(fn, {"fc.weight": torch.randn(3, 4, requires_grad=True)}, torch.randn(5, 4))


def test_a_pass_that_drops_meta_val_is_named_by_the_invariant_check() -> None:
    joint, _ = _mlp_joint()
    graph = joint.gm.graph

    def careless(state):
        with graph.inserting_before(graph.output_node()):
            graph.call_function(aten.neg.default, (joint.primals[0],))  # no meta["val"]
        return state

    with pytest.raises(
        PassInvariantError, match=r"after pass 'careless': node neg\w* \(aten.neg.default\) has no valid meta\['val'\]"
    ):
        run_passes([Pass("careless", careless)], None, joint.gm, check=True)


def test_a_pass_that_makes_an_output_alias_an_input_is_refused() -> None:
    joint, fake_mode = _mlp_joint()
    graph = joint.gm.graph

    def aliasing(state):
        with graph.inserting_before(graph.output_node()):
            alias = Emitter(graph, fake_mode)(aten.alias.default, joint.primals[0])
        outputs = list(graph.output_node().args[0])
        outputs[0] = alias
        graph.output_node().args = (outputs,)
        return state

    run_passes([Pass("harmless", lambda state: state)], None, joint.gm, check=True)
    with pytest.raises(PassInvariantError, match=r"after pass 'aliasing': new aliasing .*\('output 0', 'input 0'\)"):
        run_passes([Pass("aliasing", aliasing)], None, joint.gm, check=True)


def test_a_privacy_error_names_its_pass_and_a_dump_has_the_graph_after_each_pass(tmp_path) -> None:
    joint, _ = _mlp_joint()
    mm = joint.gm.graph.find_nodes(op="call_function", target=aten.mm.default)[0]

    def refuses(state):
        raise node_error(PrivacyError, mm, "a reason", "a fix")

    passes = [Pass("first", lambda state: state), Pass("refuses", refuses)]
    with pytest.raises(PrivacyError) as info:
        run_passes(passes, None, joint.gm, dump=str(tmp_path), label="joint")
    assert str(info.value).startswith("aten.mm.default at ")
    assert str(info.value).endswith("\n  why: a reason\n  fix: a fix\n  pass: refuses")
    (folder,) = tmp_path.iterdir()
    assert folder.name == "000-joint"
    assert sorted(p.name for p in folder.iterdir()) == ["00-input.txt", "01-first.txt"]
    assert "torch.ops.aten.mm.default" in (folder / "01-first.txt").read_text()


def test_the_pipeline_names_the_pass_of_a_user_facing_error() -> None:
    from helpers import raises_bk

    from bkcompile.errors import SampleMixingError

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    options = {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "sum"}
    compiled = torch.compile(model, backend="bk_dp", options=options)
    with raises_bk(SampleMixingError, "aten._native_batch_norm_legit_functional.default at ", "\n  pass: buffers"):
        compiled(torch.randn(5, 4)).sum().backward()


def test_the_dump_option_writes_every_pass_of_the_pipeline(tmp_path) -> None:
    model = torch.nn.Linear(4, 3)
    options = {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "sum", "dump": str(tmp_path)}
    torch.compile(model, backend="bk_dp", options=options)(torch.randn(5, 4)).sum().backward()
    (folder,) = tmp_path.iterdir()
    names = ["input", "buffers", "batch_axis", "sites", "loss_scale", "groups", "cost", "clipping"]
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:02d}-{n}.txt" for i, n in enumerate(names)]
    assert "bkcompile.record_norms" in (folder / "07-clipping.txt").read_text()


def _one_op(target, *args):
    """A graph ``x -> target(x, *args)`` on a fake (5, 4) ``x``: the graph, the op's node, the fake mode."""
    with FakeTensorMode() as fake_mode:
        value = torch.empty(5, 4)
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        x.meta["val"] = value
        node = graph.call_function(target, (x, *args))
        node.meta["val"] = target(value, *args)
    return graph, node, fake_mode


def test_an_op_reading_a_decomposed_tuple_whole_is_an_error_not_an_assertion() -> None:
    graph, var_mean, fake_mode = _one_op(aten.var_mean.correction, [0])
    graph.output([var_mean])
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    with pytest.raises(NotSupportedYetError, match="reads the whole output tuple of aten.var_mean.correction"):
        inline_decompositions(gm, [aten.var_mean.correction], get_decompositions([aten.var_mean.correction]), fake_mode)


def test_an_op_without_a_per_sample_form_is_an_error_not_an_assertion() -> None:
    graph, neg, fake_mode = _one_op(aten.neg.default)
    with pytest.raises(NotSupportedYetError, match="(?s)aten.neg.default at .*no per-sample form"):
        _lift(Emitter(graph, fake_mode), neg, neg.args[0])


def test_node_error_without_a_node_speaks_of_the_compiled_function() -> None:
    error = node_error(PrivacyError, None, "why", "fix")
    error.in_pass("inputs")
    error.in_pass("outer")  # the innermost pass wins
    assert str(error) == "the compiled function\n  why: why\n  fix: fix\n  pass: inputs"


def test_a_foreign_exception_in_a_pass_is_an_internal_error_naming_the_pass_and_the_op() -> None:
    import sympy
    from bkcompile.passes.ops.table import RuleInput

    from bkcompile.errors import InternalError

    joint, _ = _mlp_joint()
    mm = joint.gm.graph.find_nodes(op="call_function", target=aten.mm.default)[0]

    def buggy(state):  # a bkcompile bug: the pass asks a rule input for the fact of a node it has none of
        return RuleInput(mm, sympy.Integer(5), {}).fact(mm)

    with pytest.raises(InternalError) as info:
        run_passes([Pass("first", lambda state: state), Pass("buggy", buggy)], None, joint.gm)
    message = str(info.value)
    assert message.startswith("aten.mm.default at ")
    assert f"\n  why: bkcompile's pass failed with KeyError: {mm.name} (a bug of bkcompile" in message
    assert message.endswith("\n  pass: buggy")
    assert isinstance(info.value.__cause__, KeyError)


def test_a_stop_iteration_outside_any_node_speaks_of_the_compiled_function() -> None:
    from bkcompile.errors import InternalError

    joint, _ = _mlp_joint()
    with pytest.raises(InternalError, match=r"^the compiled function\n  why: .* StopIteration") as info:
        run_passes([Pass("empty", lambda state: next(iter(())))], None, joint.gm)
    assert isinstance(info.value.__cause__, StopIteration)


def test_an_option_error_raised_in_a_pass_names_the_pass_and_stays_an_option_error() -> None:
    from bkcompile.errors import OptionError

    joint, _ = _mlp_joint()

    def refuses(state):
        raise OptionError("option 'clipping': parameter 'x' is in no clipping group")

    with pytest.raises(OptionError) as info:
        run_passes([Pass("groups", refuses)], None, joint.gm)
    assert str(info.value) == "option 'clipping': parameter 'x' is in no clipping group\n  pass: groups"


def test_a_rule_reading_an_argument_the_schema_lacks_is_an_internal_error() -> None:
    from bkcompile.passes.ops.table import schema_arg

    from bkcompile.errors import InternalError

    graph, neg, _ = _one_op(aten.neg.default)
    with pytest.raises(InternalError, match=r"(?s)aten.neg.default at .*reads the argument 'dim', which the op"):
        schema_arg(neg, "dim")
    assert schema_arg(neg, "self") is neg.args[0]


def test_a_parameter_in_no_group_is_a_pass_invariant_error() -> None:
    from bkcompile.plan import ClipGroup, Grouping

    grouping = Grouping((ClipGroup("all", "all", (0,), 1.0, True),))
    assert grouping.group_of(0) == 0
    with pytest.raises(PassInvariantError, match="graph input 1 is in no clipping group"):
        grouping.group_of(1)


def test_a_foreign_exception_of_the_pipeline_reaches_the_user_as_an_internal_error(monkeypatch) -> None:
    import bkcompile.passes as pipeline
    from helpers import raises_bk

    from bkcompile.errors import InternalError

    def broken(*args, **kwargs):
        raise AssertionError("a bkcompile bug")

    monkeypatch.setattr(pipeline, "find_sites", broken)
    model = torch.nn.Linear(4, 3)
    options = {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "sum"}
    compiled = torch.compile(model, backend="bk_dp", options=options)
    with raises_bk(InternalError, "failed with AssertionError: a bkcompile bug", "\n  pass: sites"):
        compiled(torch.randn(5, 4)).sum().backward()


def test_run_error_is_what_why_and_fix_of_the_type_asked_for() -> None:
    from bkcompile.errors import ClipOnceError, ReleaseError, release_error, run_error

    error = run_error(ClipOnceError, "a second backward", "a reason", "a fix")
    assert type(error) is ClipOnceError and str(error) == "a second backward\n  why: a reason\n  fix: a fix"
    assert type(release_error("w", "y", "f")) is ReleaseError
