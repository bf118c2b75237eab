"""Assertions on a finished trace, written for tests: ``t.assert_all_reached()`` and friends.

Each raises :class:`AssertionError` with a message that lists every offender, and hides its own
frame from pytest tracebacks (``__tracebackhide__``), so a failing test points at the test's line.

# NOTE [share of a module]
# A part's share of a leaf is its projection on the final gradient, s = <p, G> / <G, G> (see
# NOTE [shares] in analysis/breakdown.py). For a group of leaves (a module) the share is the projection on
# the concatenated gradient: sum_i s_i |G_i|^2 / sum_i |G_i|^2 -- big parameters weigh more, and the
# shares of all backward calls still add up to 100%.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradprobe.capture.sites import name_in_frame, user_frame
from gradprobe.capture.targets import LeafNamer

if TYPE_CHECKING:
    from gradprobe.analysis.breakdown import LeafBreakdown
    from gradprobe.analysis.split import Split
    from gradprobe.capture.host import PluginHost
    from gradprobe.ledger.ledger import BackwardRecord
    from gradprobe.findings import Finding

__all__ = ["TraceAssertions"]

_RANK = {"info": 0, "warning": 1, "error": 2}
_NO_MODULE = "(tensors)"


class TraceAssertions:
    """Test helpers mixed into :class:`~gradprobe.Trace`."""

    if TYPE_CHECKING:

        @property
        def findings(self) -> list[Finding]: ...

        @property
        def records(self) -> tuple[BackwardRecord, ...]: ...

        def breakdown(self) -> list[LeafBreakdown]: ...

        def splits(self) -> list[Split]: ...

        _plugins: PluginHost

    def assert_no_findings(self, severity: str = "warning", *, ignore: tuple[str, ...] | list[str] = ()) -> None:
        """Fail if the trace has findings of ``severity`` or worse (codes in ``ignore`` excepted).

        Example::

            with gradprobe.trace(model) as t:
                loss.backward()
            t.assert_no_findings()                    # warnings and errors fail
            t.assert_no_findings(severity="error")    # only errors fail
        """
        __tracebackhide__ = True
        if severity not in _RANK:
            raise ValueError(f"assert_no_findings(severity=...) must be 'error', 'warning' or 'info', got {severity!r}")
        offenders = [
            f for f in self.findings if _RANK[f.severity] >= _RANK[severity] and f.code not in set(ignore)
        ]
        if offenders:
            worse = "" if severity == "error" else " or worse"
            lines = [f"gradprobe found {_plural(len(offenders), 'finding')} of severity {severity!r}{worse}:"]
            lines += [f"  {f.format()}" for f in offenders]
            raise AssertionError("\n".join(lines))

    def assert_all_reached(self, *targets: Any) -> None:
        """Fail if a parameter got no gradient from any backward call of the trace.

        Without arguments every leaf the trace records is checked (with ``trace(model)`` that is every
        trainable parameter of ``model``). Give modules or tensors to check those instead; that is
        needed with ``trace()`` of every leaf, which only learns of the leaves a backward reaches.
        The message lists the parameters that got nothing, grouped by module.
        """
        __tracebackhide__ = True
        rows = self.breakdown()
        if targets:
            by_tensor = {id(row.leaf.tensor): row for row in rows if row.leaf.tensor is not None}
            checked = [(name, by_tensor.get(id(p))) for name, p in _named_leaves(targets, user_frame(1))]
            missing = [row.leaf.name if row else name for name, row in checked if row is None or not row.reached]
            total = len(checked)
        else:
            missing = [row.leaf.name for row in rows if not row.reached]
            total = len(rows)
        if not missing:
            return
        groups: dict[str, list[str]] = {}
        for name in missing:
            module, _, short = name.rpartition(".")
            groups.setdefault(module or _NO_MODULE, []).append(short)
        calls = len(self.records)
        source = f"the trace's {_plural(calls, 'backward call')}" if calls else "any backward call"
        lines = [f"{len(missing)} of {_plural(total, 'traced parameter')} got no gradient from {source}:"]
        lines += [f"  {module}: {', '.join(names)}" for module, names in groups.items()]
        if not calls:
            lines.append("No backward call ran inside the `with gradprobe.trace(...)` block: call loss.backward() in it.")
        else:
            lines.append(
                "No loss reaches these parameters, so they never train: check that their output feeds a loss "
                "(no .detach() or torch.no_grad() on the way), or freeze them with requires_grad_(False)."
            )
        raise AssertionError("\n".join(lines))

    def assert_share(
        self,
        target: Any,
        loss: str | int,
        *,
        at_least: float | None = None,
        at_most: float | None = None,
    ) -> None:
        """Fail unless ``loss``'s share of ``target``'s final gradient lies in ``[at_least, at_most]``.

        Args:
            target: a parameter, a module (its parameters together), or a name: a leaf's name
                (``"fc1.weight"``) or a module's (``"head_b"``).
            loss: a backward call's name as in the report (``"loss_cls"``; all calls of that name
                together) or its index in ``trace.records``; or, with ``trace(..., decompose=True)``,
                a component loss of a decomposed backward (``t.losses({"cls": ...})``): its share of
                what the last backward decomposed with that loss added to ``target``.
            at_least: lowest share accepted, as a fraction (0.1 is 10%).
            at_most: highest share accepted.

        Example::

            with gradprobe.trace(model, keep="tensors") as t:
                loss_cls.backward(retain_graph=True)
                loss_box.backward()
            t.assert_share(model.cls_head, "loss_cls", at_least=0.99)
            t.assert_share("backbone", "loss_box", at_least=0.1, at_most=0.9)
        """
        __tracebackhide__ = True
        if at_least is None and at_most is None:
            raise ValueError("assert_share() needs at_least=..., at_most=... or both (fractions, 0.1 is 10%)")
        label, rows = self._rows_of(target)
        component = self._component_share(loss, rows)
        if component is not None:
            chosen, shares, share = [], {}, component[0]
        else:
            chosen = self._records_named(loss)
            shares = {r.index: _share(rows, r.index) for r in self.records if r.accumulates}
            share = _sum_shares([shares[r.index] for r in chosen])
        if share is None:
            raise ValueError(
                f"the share of {loss!r} in {label} is not known: some .grad there is the sum of three or more "
                "contributions, and keep='stats' cannot split that; trace with keep='tensors'"
            )
        too_low = at_least is not None and share < at_least
        too_high = at_most is not None and share > at_most
        if not (too_low or too_high):
            return
        wanted = " and ".join(
            text
            for text in (
                f"at least {_percent(at_least)}" if at_least is not None else "",
                f"at most {_percent(at_most)}" if at_most is not None else "",
            )
            if text
        )
        norm2 = sum((row.grad_norm or 0.0) ** 2 for row in rows)
        lines = [
            f"{loss!r} has a share of {_percent(share)} in the gradient of {label} "
            f"({_plural(len(rows), 'parameter')}, ‖.grad‖ {norm2 ** 0.5:.4g}); expected {wanted}.",
            "Shares of every backward call:",
        ]
        if component is not None:
            lines[-1] = f"Shares of the losses of backward #{component[1]}:"
            lines += [f"  {name}: {_percent(value)}" for name, value in component[2]]
            raise AssertionError("\n".join(lines))
        for record in self.records:
            if record.accumulates:
                where = f" ({record.site})" if record.site else ""
                lines.append(f"  #{record.index} {record.name}{where}: {_percent(shares[record.index])}")
        raise AssertionError("\n".join(lines))

    def _component_share(
        self, loss: str | int, rows: list[LeafBreakdown]
    ) -> tuple[float | None, int, list[tuple[str, float | None]]] | None:
        """``loss`` as a component of the last decomposed backward that has it: (share, record, all shares)."""
        if not isinstance(loss, str) or any(r.name == loss for r in self.records):
            return None
        if self._plugins.get_plugin("decompose") is None:
            return None
        splits = [s for s in self.splits() if s.kind == "decomposed" and loss in s.losses]
        if not splits:
            return None
        split = splits[-1]
        wanted = {id(row.leaf) for row in rows}
        leaves = [leaf for leaf in split.leaves if id(leaf.leaf) in wanted]
        k = len(split.losses)
        if not leaves or any(leaf.gram is None for leaf in leaves):
            return None, split.record or 0, []
        gram = [[sum(leaf.gram[i][j] for leaf in leaves) for j in range(k)] for i in range(k)]  # type: ignore[index]
        total = sum(map(sum, gram))
        shares = [sum(row) / total if total > 0 else None for row in gram]
        return shares[split.losses.index(loss)], split.record or 0, list(zip(split.losses, shares))

    # -- helpers ---------------------------------------------------------------------------

    def _records_named(self, loss: str | int) -> list[BackwardRecord]:
        records = self.records
        if isinstance(loss, bool) or not isinstance(loss, (str, int)):
            raise TypeError(f"assert_share(loss=...) takes a backward call's name or index, got {type(loss).__name__}")
        if isinstance(loss, int):
            log = self._ledger.records
            found = log.get(loss) if loss >= 0 else (log[loss] if -len(records) <= loss else None)
            if found is None:
                kept = f"#{records[0].index}–#{records[-1].index}" if records else "none"
                raise ValueError(
                    f"assert_share(): no backward call #{loss} is kept; the trace recorded {len(log)} "
                    f"(kept in full: {kept})"
                )
            chosen = [found]
        else:
            chosen = [r for r in records if r.name == loss]
            if not chosen:
                names = sorted({r.name for r in records})
                raise ValueError(f"assert_share(): no backward call is named {loss!r}; the calls are {names}")
        grads = [r for r in chosen if not r.accumulates]
        if grads:
            raise ValueError(
                f"assert_share(): {loss!r} is a torch.autograd.grad call, which adds nothing to .grad, "
                "so it has no share of it"
            )
        return chosen

    def _rows_of(self, target: Any) -> tuple[str, list[LeafBreakdown]]:
        rows = self.breakdown()
        if isinstance(target, str):
            return _rows_by_name(rows, target)
        by_tensor = {id(row.leaf.tensor): row for row in rows if row.leaf.tensor is not None}
        if isinstance(target, torch.Tensor):
            row = by_tensor.get(id(target))
            if row is None:
                raise ValueError(
                    f"assert_share(): the tensor of shape {tuple(target.shape)} is not recorded by this trace; "
                    "pass it (or its module) to gradprobe.trace(...)"
                )
            return row.leaf.name, [row]
        if isinstance(target, nn.Module):
            params = [p for p in target.parameters() if p.requires_grad]
            found = [by_tensor[id(p)] for p in params if id(p) in by_tensor]
            label = name_in_frame(user_frame(1), target) or _common_module(found) or type(target).__name__
            if not found:
                raise ValueError(f"assert_share(): no parameter of {label} is recorded by this trace")
            return label, found
        raise TypeError(
            f"assert_share() takes a parameter, a module or a name, got {type(target).__name__}"
        )


def _rows_by_name(rows: list[LeafBreakdown], name: str) -> tuple[str, list[LeafBreakdown]]:
    exact = [row for row in rows if row.leaf.name == name]
    if exact:
        return name, exact
    # a module's name, or a dotted suffix of names (`head_b` matches `model.head_b.weight`)
    wanted = name.split(".")
    prefixes: dict[str, list[LeafBreakdown]] = {}
    for row in rows:
        parts = row.leaf.name.split(".")
        for start in range(len(parts) - len(wanted) + 1):
            if parts[start : start + len(wanted)] == wanted:
                prefixes.setdefault(".".join(parts[: start + len(wanted)]), []).append(row)
                break
    if not prefixes:
        known = sorted(row.leaf.name for row in rows)
        raise ValueError(f"assert_share(): no recorded leaf or module is called {name!r}; the leaves are {known}")
    if len(prefixes) > 1:
        raise ValueError(f"assert_share(): {name!r} is ambiguous, it matches {sorted(prefixes)}; use the full name")
    ((full_name, found),) = prefixes.items()
    return full_name, found


def _share(rows: list[LeafBreakdown], record: int) -> float | None:
    """One backward call's share of the concatenated final gradient of ``rows`` (NOTE [share of a module])."""
    total = 0.0
    weighted = 0.0
    for row in rows:
        g2 = (row.grad_norm or 0.0) ** 2
        if g2 == 0.0:
            continue
        total += g2
        part = row.part(record)
        if part is None or not part.in_grad:
            continue
        if part.share is None:
            return None
        weighted += part.share * g2
    return weighted / total if total > 0 else 0.0


def _sum_shares(shares: list[float | None]) -> float | None:
    if any(s is None for s in shares):
        return None
    return sum(s for s in shares if s is not None)


def _common_module(rows: list[LeafBreakdown]) -> str | None:
    """The module path the rows' leaves share (``model.cls_head``), named by the trace's rule."""
    paths = [row.leaf.module.split(".") for row in rows if row.leaf.module]
    if not paths or len(paths) != len(rows):
        return None
    common = paths[0]
    for path in paths[1:]:
        n = 0
        while n < min(len(common), len(path)) and common[n] == path[n]:
            n += 1
        common = common[:n]
    return ".".join(common) or None


def _flat_targets(targets: tuple[Any, ...] | list[Any]) -> list[Any]:
    flat: list[Any] = []
    for target in targets:
        if isinstance(target, (list, tuple)):
            flat += _flat_targets(target)
        elif isinstance(target, (nn.Module, torch.Tensor)):
            flat.append(target)
        else:
            raise TypeError(f"assert_all_reached() takes modules or tensors, got {type(target).__name__}")
    return flat


def _named_leaves(targets: tuple[Any, ...], frame: Any) -> list[tuple[str, torch.Tensor]]:
    """The parameters of ``targets``, named as the trace names leaves (NOTE [leaf names])."""
    flat = _flat_targets(targets)
    namer = LeafNamer(frame, [t for t in flat if isinstance(t, nn.Module)])
    out: list[tuple[str, torch.Tensor]] = []
    for target in flat:
        if isinstance(target, nn.Module):
            out += [(name, p) for p, name, _ in namer.parameters_of(target)]
        else:
            named = namer.name(target)
            out.append((named[0] if named else f"tensor of shape {tuple(target.shape)}", target))
    return out


def _percent(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.1f}%"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"
