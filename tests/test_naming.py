"""One naming rule for leaves, however they reach the trace (NOTE [leaf names] in capture/targets.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import gradprobe
from fake_library import load_fake_library  # tests/ is on sys.path (conftest.py)
from gradprobe.capture.targets import matching_names

FULL = ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def _leaves(t: gradprobe.Trace) -> list[tuple[str, str | None]]:
    return [(leaf.name, leaf.module) for leaf in t.leaves]


def _traced(model: nn.Module, *targets: Any) -> gradprobe.Trace:
    """``trace(*targets)`` called here, where the model is the local variable ``model``."""
    with gradprobe.trace(*targets, on_finding="record") as t:
        model(torch.randn(2, 3)).sum().backward()
    return t


# every way of passing the same model, each evaluated in the frame that calls trace()
WAYS: dict[str, Callable[[nn.Sequential], tuple[Any, ...]]] = {
    "module": lambda m: (m,),
    "parameters()": lambda m: (m.parameters(),),
    "list of parameters": lambda m: (list(m.parameters()),),
    "tuple of parameters": lambda m: (tuple(m.parameters()),),
    "dict .values()": lambda m: (dict(m.named_parameters()).values(),),
    "named tensors": lambda m: (m[0].weight, m[0].bias, m[2].weight, m[2].bias),
    "submodules": lambda m: (m[0], m[2]),
    "nested lists": lambda m: ([m[0], [m[2].weight, m[2].bias]],),
    "every leaf": lambda m: (),
}


@pytest.mark.parametrize("way", list(WAYS))
def test_every_way_of_passing_a_model_gives_the_same_names(way: str) -> None:
    """module, .parameters(), a list, dict.values(), tensors, submodules, trace(): `model.0.weight` each time."""
    model = _net()
    t = _traced(model, *WAYS[way](model))
    assert sorted(_leaves(t)) == sorted((name, name.rpartition(".")[0]) for name in FULL)


def test_a_submodule_passed_alone_is_named_under_the_outer_model() -> None:
    """`trace(model[0])` and `head = model[0]; trace(head)` name `model.0.weight`, never bare `weight`."""
    model = _net()
    assert _leaves(_traced(model, model[0])) == [("model.0.weight", "model.0"), ("model.0.bias", "model.0")]
    head = model[2]
    with gradprobe.trace(head, on_finding="record") as t:
        model(torch.randn(2, 3)).sum().backward()
    assert _leaves(t) == [("model.2.weight", "model.2"), ("model.2.bias", "model.2")]


def test_a_loose_tensor_keeps_its_variable_and_has_no_module() -> None:
    """A tensor no module holds is named by its variable, else `tensor#N[shape]`; its module is None."""
    model = _net()
    scale = torch.ones(1, requires_grad=True)
    with gradprobe.trace(model, scale, torch.zeros(2, requires_grad=True), on_finding="record") as t:
        (model(torch.randn(2, 3)) * scale).sum().backward()
    assert _leaves(t)[-2:] == [("scale", None), ("tensor#0[2]", None)]
    assert [name for name, _ in _leaves(t)[:4]] == FULL


class _Runner:
    """Not a module: its modules are named through `self`."""

    def __init__(self) -> None:
        self.model = _net()

    def traced(self, *targets: Any) -> gradprobe.Trace:
        with gradprobe.trace(*targets, on_finding="record") as t:
            self.model(torch.randn(2, 3)).sum().backward()
        return t


@pytest.mark.parametrize("how", ["module", "parameters", "submodule", "every leaf"])
def test_modules_held_by_self_are_named_through_self(how: str) -> None:
    """`trace(self.model)` in a method names `self.model.0.weight`, also with no targets."""
    runner = _Runner()
    m = runner.model
    targets = {"module": (m,), "parameters": (m.parameters(),), "submodule": (m[0], m[2]), "every leaf": ()}[how]
    t = runner.traced(*targets)
    assert sorted(leaf.name for leaf in t.leaves) == sorted(f"self.{name}" for name in FULL)
    assert {leaf.module for leaf in t.leaves} == {"self.model.0", "self.model.2"}


def test_a_module_that_is_itself_self_names_its_parameters_through_self() -> None:
    """Inside a module's own method (a LightningModule's step), `self` is the outermost module."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _net()

        def traced(self) -> gradprobe.Trace:
            with gradprobe.trace(self.body, on_finding="record") as t:
                self.body(torch.randn(2, 3)).sum().backward()
            return t

    t = Model().traced()
    assert [leaf.name for leaf in t.leaves] == [f"self.body.{name[len('model.'):]}" for name in FULL]


def test_a_module_no_variable_holds_is_named_by_its_class() -> None:
    """`trace(make())`: `Sequential.0.weight`; a second one of the same class `Sequential#2.…`."""
    with gradprobe.trace(_net(), _net(), nn.Linear(2, 2), on_finding="record") as t:
        pass
    names = [leaf.name for leaf in t.leaves]
    assert names[:4] == ["Sequential.0.weight", "Sequential.0.bias", "Sequential.2.weight", "Sequential.2.bias"]
    assert names[4:8] == [f"Sequential#2.{n}" for n in ("0.weight", "0.bias", "2.weight", "2.bias")]
    assert names[8:] == ["Linear.weight", "Linear.bias"]
    assert t.leaves[0].module == "Sequential.0" and t.leaves[-1].module == "Linear"


def test_an_unnamed_submodule_passed_with_its_model_takes_the_model_class_path() -> None:
    """Two unnamed modules, one inside the other: the outer one is the root of both."""
    net = _net
    outer = [net()]  # held in a list: no variable names the module itself
    with gradprobe.trace(outer[0][2], outer[0], on_finding="record") as t:
        pass
    assert [leaf.name for leaf in t.leaves] == ["Sequential.2.weight", "Sequential.2.bias", "Sequential.0.weight", "Sequential.0.bias"]


def test_a_shared_parameter_takes_its_first_name() -> None:
    """A weight tied between two modules is one leaf, named by the first module in scope."""
    enc = nn.Linear(3, 3)
    dec = nn.Linear(3, 3)
    dec.weight = enc.weight
    x = torch.randn(2, 3)
    with gradprobe.trace(enc, dec, on_finding="record") as t:
        dec(enc(x)).sum().backward()
    assert _leaves(t) == [("enc.weight", "enc"), ("enc.bias", "enc"), ("dec.bias", "dec")]
    with gradprobe.trace(on_finding="record") as t2:
        dec(enc(x)).sum().backward()
    assert sorted(_leaves(t2)) == sorted(_leaves(t))


def test_a_wrapper_does_not_hide_the_module_it_wraps() -> None:
    """DataParallel (like DDP and torch.compile) around a named model: `model.0.weight`, not `dp.module.…`."""
    model = _net()
    dp = nn.DataParallel(model)  # on CPU it just calls the module
    with gradprobe.trace(dp, on_finding="record") as t:
        dp(torch.randn(2, 3)).sum().backward()
    assert [leaf.name for leaf in t.leaves] == FULL
    del model
    with gradprobe.trace(dp, on_finding="record") as t2:
        pass
    assert [leaf.name for leaf in t2.leaves] == [f"dp.module.{n[len('model.'):]}" for n in FULL]


def test_a_module_level_model_is_in_scope_of_a_function(tmp_path: Path) -> None:
    """A script's global `model` names the parameters passed from inside one of its functions."""
    script = tmp_path / "script_globals.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            import gradprobe

            model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))

            def step(params):
                with gradprobe.trace(params, on_finding="record") as t:
                    model(torch.randn(2, 3)).sum().backward()
                return [leaf.name for leaf in t.leaves]

            NAMES = step(list(model.parameters()))
            """
        )
    )
    namespace: dict[str, Any] = {"__name__": "script_globals"}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    assert namespace["NAMES"] == FULL


def test_a_training_librarys_own_variables_do_not_name_the_leaves(tmp_path: Path) -> None:
    """A trace opened inside a library (a callback) names leaves from the user's frame above it."""
    lib = load_fake_library(
        tmp_path,
        "lightning",
        """
        import gradprobe

        def fit(pl_module, x):
            with gradprobe.trace(pl_module, on_finding="record") as t:
                pl_module(x).sum().backward()
            return t
        """,
    )
    model = _net()
    t = lib.fit(model, torch.randn(2, 3))
    assert [leaf.name for leaf in t.leaves] == FULL


def test_the_module_tree_starts_at_the_models_modules() -> None:
    """Folded, every name shares `model.`: the top rows are the model's modules, named in full."""
    from gradprobe.report.tree import fold

    model = nn.Sequential(*[nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)) for _ in range(12)])
    with gradprobe.trace(model, on_finding="record") as t:
        model(torch.randn(1, 2)).sum().backward()
    shown, note = fold(t.breakdown(), depth=1)
    assert note and all(row.label.startswith("model.") or row.more for row in shown)
    assert len([row for row in shown if not row.more]) > 1


def test_lookups_accept_the_named_parameters_name() -> None:
    """assert_share / split.leaf take the full name, the `named_parameters()` name or a module's name."""
    model = _net()
    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        out = model(torch.randn(5, 3))
        losses = t.losses({"a": out.square().mean(), "b": out.mean()})
        (losses["a"] + losses["b"]).backward()
    (split,) = [s for s in t.splits() if s.kind == "decomposed"]
    assert split.leaf("0.weight") is split.leaf("model.0.weight")
    with pytest.raises(KeyError, match="ambiguous"):
        split.leaf("weight")
    with pytest.raises(KeyError, match="no leaf named"):
        split.leaf("1.weight")
    t.assert_share(model[2], "a", at_least=0.0)
    t.assert_share("2.weight", "a", at_least=0.0)
    t.assert_share("model.2", "a", at_least=0.0)


def test_matching_names_takes_a_full_name_or_a_dotted_tail() -> None:
    names = ["model.0.weight", "model.10.weight", "model.block.0.weight", "scale"]
    assert matching_names(names, "model.0.weight") == ["model.0.weight"]
    assert matching_names(names, "10.weight") == ["model.10.weight"]
    assert matching_names(names, "0.weight") == ["model.0.weight", "model.block.0.weight"]
    assert matching_names(names, "scale") == ["scale"]
    assert matching_names(names, "cale") == []


def test_assertion_messages_use_the_same_names() -> None:
    """assert_all_reached(model.head) and assert_share(model.head, …) name `model.2…`, not `Linear`."""
    model = _net()
    with gradprobe.trace(model, on_finding="record") as t:
        model[0](torch.randn(2, 3)).sum().backward()
    with pytest.raises(AssertionError, match=r"model\.2: weight, bias"):
        t.assert_all_reached(model[2])
    with pytest.raises(AssertionError, match=r"model\.2: weight, bias"):
        t.assert_all_reached([model[0], [model[2].weight, model[2].bias]])
    with pytest.raises(AssertionError, match=r"in the gradient of model\.0 "):
        t.assert_share(model[0], 0, at_most=0.5)


def test_odd_objects_in_scope_never_break_a_trace(tmp_path: Path) -> None:
    """A lazy proxy whose `__class__` raises and a module that cannot be walked, as globals: names still come."""
    script = tmp_path / "script_odd_globals.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            import gradprobe

            class Proxy:  # like a web framework's unbound request proxy
                @property
                def __class__(self):
                    raise RuntimeError("working outside of a request")

            class Broken(nn.Module):
                def modules(self):
                    raise RuntimeError("cannot walk")

                def named_parameters(self, *args, **kwargs):
                    raise RuntimeError("cannot walk")

            request = Proxy()
            broken = Broken()
            model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))

            # amp: its GradScaler scan of the globals has the same isinstance() problem (left to its owner)
            def step():
                with gradprobe.trace(model.parameters(), on_finding="record", disable=["amp"]) as t:
                    model(torch.randn(2, 3)).sum().backward()
                with gradprobe.trace(on_finding="record", disable=["amp"]) as t2:
                    model(torch.randn(2, 3)).sum().backward()
                return [leaf.name for leaf in t.leaves], [leaf.name for leaf in t2.leaves]

            NAMES = step()
            """
        )
    )
    namespace: dict[str, Any] = {"__name__": "script_odd_globals"}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    assert namespace["NAMES"] == (FULL, FULL)
