"""Random autograd programs, run untraced and traced: PyTorch is the oracle (helper for the differential fuzz).

A program is Python source: a setup (``torch.manual_seed`` and the leaf tensors) and a body of 20-40
statements (forward ops, in-place writes, optimizer-like writes under ``torch.no_grad()``, several roots,
then backward / ``autograd.grad`` calls). Everything is built from ``random.Random(seed)``, so a seed
names a program, and a failure prints source that runs as it stands.

The runner executes one statement at a time (``exec`` in a fresh namespace per run, with line numbers
that match the printed source and the source registered in ``linecache``), recording per statement
whether it raised and what. Variants:

- ``untraced``: the oracle.
- ``raise/...``: ``gradprobe.trace(on_finding="raise")``. gradprobe must raise GradProbeError (with the
  predicted code) exactly where PyTorch raises an error it predicts, PyTorch's own error elsewhere,
  and nothing on a statement PyTorch runs cleanly. The run stops at the first error (state diverges
  there: PyTorch's failing backward may already have freed or accumulated part of the graph).
- ``record/...``: ``on_finding="record"``: the same outcome at every statement, bitwise equal gradients,
  values and ``autograd.grad`` results, and no warning/error finding when PyTorch ran the program cleanly.
  No difference is allowed (``RECORD_STAND_INS`` is empty: gradprobe installs no saved-tensor hooks).
- ``.../every``: ``trace()`` with no targets (every leaf); ``.../targets``: the leaves that require grad
  and get a gradient in the untraced run as targets (so GP503 "parameter never reached" is not expected).

Every variant also checks that nothing is left installed after the trace.

Run ``python tests/fuzz_programs.py --n 2000`` for a campaign report with minimized repros.
"""

from __future__ import annotations

import argparse
import dataclasses
import linecache
import random
import re
import sys
import textwrap
import warnings
from collections import Counter
from typing import Any, Optional

import torch

import gradprobe

PRELUDE = '''\
import torch
import gradprobe


class MulSave(torch.autograd.Function):  # saves tensors for backward
    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return x * y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return g * y, g * x


class Scale2(torch.autograd.Function):  # saves nothing
    @staticmethod
    def forward(ctx, x):
        return x * 2.0

    @staticmethod
    def backward(ctx, g):
        return g * 2.0

'''
_CLASSES = {"MulSave": PRELUDE.index("class MulSave"), "Scale2": PRELUDE.index("class Scale2")}

# PyTorch errors gradprobe predicts (a regex on the first line), and the code it must raise instead
# (under on_finding="raise")
PREDICTED = (
    ("backward through the graph a second time", "GP101", "freed-graph"),
    ("modified by an inplace operation", "GP302", "inplace"),
    (r"element \d+ of tensors does not require grad", "GP501", "no-grad root"),
)
# where gradprobe's saved-tensor hooks stand in for PyTorch's version check, its error may replace PyTorch's
RECORD_STAND_INS: dict[str, str] = {}  # none: gradprobe installs no saved-tensor hooks, PyTorch's check stays its own

# Warnings a correct program can earn: they judge the gradients, not whether PyTorch will raise.
# Random programs often have two losses whose gradients point against each other.
# Categories that start with this are documented limitations: counted and reported, never a failure.
LIMITATION = "known limitation: "
ALLOWED_ON_CLEAN = {
    "GP400": "two losses pull a module's gradient against each other (a fact of the program)",
    # the generator passes retain_graph=True at random; dropping it where GP112 says so was checked to
    # leave those programs running (seeds 0-399: 3 warnings, all true)
    "GP112": "a retain_graph=True that no later backward needed (a fact of the program)",
}

SHAPES = [(3,), (4,), (3, 4), (4, 3), (3, 3)]


# -- the generator ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Var:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "float64"
    rg: bool  # requires grad
    leaf: bool
    base: Optional[str] = None  # the tensor this one is an (autograd) view of
    contig: bool = True
    overlap: bool = False  # expanded: in-place writes are refused by PyTorch


@dataclasses.dataclass
class Program:
    seed: int
    setup: list[str]  # torch.manual_seed + leaf creation (outside the trace)
    body: list[str]  # the traced statements
    leaves: list[str]  # leaf variable names

    def with_statements(self, setup: list[str], body: list[str]) -> Program:
        leaves = [n for n in self.leaves if any(s.startswith(f"{n} = ") for s in setup)]
        return Program(self.seed, setup, body, leaves)

    def flat_source(self) -> tuple[str, list[int], list[int]]:
        """The source exec'd statement by statement (body not indented); first line of each statement."""
        lines = PRELUDE.splitlines()
        starts_setup, starts_body = [], []
        for stmts, starts in ((self.setup, starts_setup), (self.body, starts_body)):
            for stmt in stmts:
                starts.append(len(lines) + 1)
                lines.extend(stmt.splitlines())
        return "\n".join(lines) + "\n", starts_setup, starts_body

    def repro(self, trace_args: str = 'on_finding="raise"', raising: frozenset[int] = frozenset()) -> str:
        """Runnable source: the body inside ``with gradprobe.trace(...)``; statements that raise in the
        untraced run (``raising``, other than the last one) wrapped in try/except, as the runner sees them."""
        used = "\n".join(self.body)
        prelude = PRELUDE[: min(_CLASSES.values())]
        for name, start in sorted(_CLASSES.items(), key=lambda kv: kv[1]):
            if name + ".apply" in used:
                end = min([s for s in _CLASSES.values() if s > start] + [len(PRELUDE)])
                prelude += PRELUDE[start:end]
        out = [prelude.rstrip() + "\n"] + self.setup + [f"with gradprobe.trace({trace_args}) as t:"]
        for i, stmt in enumerate(self.body):
            if i in raising and i != len(self.body) - 1:
                stmt = "try:\n" + textwrap.indent(stmt, "    ") + "\nexcept Exception as e:\n    print(repr(e))"
            out.append(textwrap.indent(stmt, "    "))
        if not self.body:
            out.append("    pass")
        return "\n".join(out) + "\n"


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.vars: list[Var] = []
        self.by_name: dict[str, Var] = {}
        self.n = 0
        self.ng = 0
        self.body: list[str] = []

    # helpers
    def new(self, shape: tuple[int, ...], dtype: str, rg: bool, **kw: Any) -> Var:
        v = Var(f"v{self.n}", tuple(shape), dtype, rg, False, **kw)
        self.n += 1
        self.vars.append(v)
        self.by_name[v.name] = v
        return v

    def pick(self, pred: Any = None, prefer_rg: float = 0.75) -> Optional[Var]:
        cands = [v for v in self.vars if pred is None or pred(v)]
        if not cands:
            return None
        rg = [v for v in cands if v.rg]
        if rg and self.rng.random() < prefer_rg:
            cands = rg
        # favour recent values: deeper graphs, more sharing
        weights = [1.0 + i for i in range(len(cands))]
        return self.rng.choices(cands, weights)[0]

    def base_of(self, v: Var) -> str:
        return v.base or v.name

    def leaf_rg_base(self, v: Var) -> bool:
        b = self.by_name[self.base_of(v)]
        return (v.leaf and v.rg) or (b.leaf and b.rg)

    @staticmethod
    def promote(*vs: Var) -> str:
        return "float64" if any(v.dtype == "float64" for v in vs) else "float32"

    def emit(self, stmt: str) -> None:
        self.body.append(stmt)

    # -- forward ops: each returns True when it emitted a statement
    def op_unary(self) -> bool:
        x = self.pick()
        if x is None:
            return False
        form = self.rng.choice(
            ["{x}.neg()", "{x} * 1.5", "{x} + 0.5", "torch.relu({x})", "torch.sigmoid({x})", "torch.tanh({x})",
             "torch.exp(torch.tanh({x}))", "torch.log({x} * {x} + 1.0)", "{x}.pow(2)", "{x}.clone()",
             "{x}.detach()", "Scale2.apply({x})"]
        )
        if form == "{x}.detach()":
            v = self.new(x.shape, x.dtype, False)
            v.leaf = True
        else:
            v = self.new(x.shape, x.dtype, x.rg)
        self.emit(f"{v.name} = " + form.format(x=x.name))
        return True

    def op_binary(self) -> bool:
        x = self.pick()
        if x is None:
            return False
        y = self.pick(lambda v: v.shape == x.shape)
        if y is None:
            return False
        if self.rng.random() < 0.25 and y.dtype == x.dtype:
            v = self.new(x.shape, x.dtype, x.rg or y.rg)
            self.emit(f"{v.name} = MulSave.apply({x.name}, {y.name})")
            return True
        o = self.rng.choice(["+", "-", "*"])
        v = self.new(x.shape, self.promote(x, y), x.rg or y.rg)
        self.emit(f"{v.name} = {x.name} {o} {y.name}")
        return True

    def op_matmul(self) -> bool:
        x = self.pick(lambda v: len(v.shape) == 2)
        if x is None:
            return False
        n, m = x.shape
        y = self.pick(lambda v: v.dtype == x.dtype and len(v.shape) >= 1 and v.shape[0] == m and len(v.shape) <= 2)
        if y is not None and self.rng.random() < 0.7:
            v = self.new((n,) + y.shape[1:], x.dtype, x.rg or y.rg)
            self.emit(f"{v.name} = {x.name} @ {y.name}")
        else:
            v = self.new((n, n), x.dtype, x.rg)
            self.emit(f"{v.name} = {x.name} @ {x.name}.t()")
        return True

    def op_reduce(self) -> bool:
        x = self.pick(lambda v: len(v.shape) >= 1)
        if x is None:
            return False
        r = self.rng.random()
        if r < 0.5 or len(x.shape) == 1:
            v = self.new((), x.dtype, x.rg)
            self.emit(f"{v.name} = {x.name}.{self.rng.choice(['sum', 'mean'])}()")
        else:
            dim = self.rng.choice([0, -1])
            shape = x.shape[1:] if dim == 0 else x.shape[:-1]
            v = self.new(shape, x.dtype, x.rg)
            self.emit(f"{v.name} = {x.name}.{self.rng.choice(['sum', 'mean'])}({dim})")
        return True

    def op_index(self) -> bool:
        x = self.pick(lambda v: len(v.shape) >= 1 and v.shape[0] >= 3)
        if x is None:
            return False
        choices = ["[0]", "[1:]", "adv", "narrow"]
        if len(x.shape) == 2:
            choices += ["[:, 1]", "[..., :2]", "adv2"]
        c = self.rng.choice(choices)
        b = self.base_of(x)
        if c == "[0]":
            v = self.new(x.shape[1:], x.dtype, x.rg, base=b, contig=x.contig)
            self.emit(f"{v.name} = {x.name}[0]")
        elif c == "[1:]":
            v = self.new((x.shape[0] - 1,) + x.shape[1:], x.dtype, x.rg, base=b, contig=x.contig)
            self.emit(f"{v.name} = {x.name}[1:]")
        elif c == "narrow":
            v = self.new((2,) + x.shape[1:], x.dtype, x.rg, base=b, contig=x.contig)
            self.emit(f"{v.name} = {x.name}.narrow(0, 1, 2)")
        elif c == "[:, 1]":
            v = self.new(x.shape[:1], x.dtype, x.rg, base=b, contig=False)
            self.emit(f"{v.name} = {x.name}[:, 1]")
        elif c == "[..., :2]":
            v = self.new(x.shape[:1] + (2,), x.dtype, x.rg, base=b, contig=False)
            self.emit(f"{v.name} = {x.name}[..., :2]")
        elif c == "adv":
            idx = [self.rng.randrange(x.shape[0]) for _ in range(3)]
            v = self.new((3,) + x.shape[1:], x.dtype, x.rg)
            self.emit(f"{v.name} = {x.name}[torch.tensor({idx})]")
        else:  # x[torch.arange(n), idx]
            n, m = x.shape
            idx = [self.rng.randrange(m) for _ in range(n)]
            v = self.new((n,), x.dtype, x.rg)
            self.emit(f"{v.name} = {x.name}[torch.arange({n}), torch.tensor({idx})]")
        return True

    def op_view(self) -> bool:
        x = self.pick(lambda v: len(v.shape) >= 1)
        if x is None:
            return False
        b = self.base_of(x)
        numel = 1
        for s in x.shape:
            numel *= s
        c = self.rng.choice(["flat", "reshape", "t", "expand", "unsqueeze"])
        if c == "flat":
            if x.contig:
                v = self.new((numel,), x.dtype, x.rg, base=b, overlap=x.overlap)
                self.emit(f"{v.name} = {x.name}.view(-1)")
            else:
                v = self.new((numel,), x.dtype, x.rg)
                self.emit(f"{v.name} = {x.name}.reshape(-1)")
        elif c == "reshape" and len(x.shape) == 2:
            shape = (x.shape[1], x.shape[0])
            v = self.new(shape, x.dtype, x.rg, base=b if x.contig else None, overlap=x.overlap and x.contig)
            self.emit(f"{v.name} = {x.name}.reshape({shape[0]}, {shape[1]})")
        elif c == "t" and len(x.shape) == 2:
            v = self.new((x.shape[1], x.shape[0]), x.dtype, x.rg, base=b, contig=False, overlap=x.overlap)
            self.emit(f"{v.name} = {x.name}." + self.rng.choice(["t()", "transpose(0, 1)"]))
        elif c == "expand" and len(x.shape) == 1:
            v = self.new((2,) + x.shape, x.dtype, x.rg, base=b, contig=False, overlap=True)
            self.emit(f"{v.name} = {x.name}.expand(2, {x.shape[0]})")
        else:
            v = self.new((1,) + x.shape, x.dtype, x.rg, base=b, contig=x.contig, overlap=x.overlap)
            self.emit(f"{v.name} = {x.name}.unsqueeze(0)")
        return True

    def op_cat(self) -> bool:
        x = self.pick(lambda v: len(v.shape) >= 1)
        if x is None:
            return False
        y = self.pick(lambda v: v.shape == x.shape and v.dtype == x.dtype)
        if y is None:
            return False
        if self.rng.random() < 0.5:
            v = self.new((2 * x.shape[0],) + x.shape[1:], x.dtype, x.rg or y.rg)
            self.emit(f"{v.name} = torch.cat([{x.name}, {y.name}])")
        else:
            v = self.new((2,) + x.shape, x.dtype, x.rg or y.rg)
            self.emit(f"{v.name} = torch.stack([{x.name}, {y.name}])")
        return True

    def op_gather(self) -> bool:
        x = self.pick(lambda v: len(v.shape) in (1, 2))
        if x is None:
            return False
        if len(x.shape) == 1:
            idx = [self.rng.randrange(x.shape[0]) for _ in range(2)]
            v = self.new((2,), x.dtype, x.rg)
            self.emit(f"{v.name} = {x.name}.gather(0, torch.tensor({idx}))")
        else:
            n, m = x.shape
            idx = [[self.rng.randrange(m) for _ in range(2)] for _ in range(n)]
            v = self.new((n, 2), x.dtype, x.rg)
            self.emit(f"{v.name} = {x.name}.gather(1, torch.tensor({idx}))")
        return True

    # -- in-place writes
    def _may_write(self, x: Var) -> bool:
        if x.overlap:
            return False
        if self.leaf_rg_base(x):
            return self.rng.random() < 0.03  # PyTorch's own "leaf Variable ... in-place" error, rarely
        return True

    def _taint(self, x: Var, rg: bool) -> None:
        if rg:
            for v in {x.name, self.base_of(x)}:
                var = self.by_name[v]
                if not var.rg:
                    var.rg, var.leaf = True, False
            for v in self.vars:  # other views of the same base now require grad too
                if v.base == self.base_of(x) and not v.rg:
                    v.rg = True

    def op_inplace(self) -> bool:
        x = self.pick(lambda v: not v.overlap and len(v.shape) >= 1, prefer_rg=0.6)
        if x is None or not self._may_write(x):
            return False
        c = self.rng.choice(["add_", "mul_", "relu_", "setitem", "iadd", "view0", "viewflat", "sigmoid_"])
        if c == "add_":
            self.emit(f"{x.name}.add_(1.0)")
        elif c == "mul_":
            self.emit(f"{x.name}.mul_(2.0)")
        elif c == "relu_":
            self.emit(f"{x.name}.relu_()")
        elif c == "sigmoid_":
            self.emit(f"{x.name}.sigmoid_()")
        elif c == "setitem":
            y = self.pick(lambda v: v.shape == x.shape[1:])
            if y is not None and self.rng.random() < 0.6:
                self.emit(f"{x.name}[{self.rng.randrange(x.shape[0])}] = {y.name}")
                self._taint(x, y.rg)
            else:
                self.emit(f"{x.name}[{self.rng.randrange(x.shape[0])}] = 0.5")
        elif c == "iadd":
            y = self.pick(lambda v: v.shape == x.shape)
            if y is None:
                return False
            self.emit(f"{x.name} += {y.name}")
            self._taint(x, y.rg)
        elif c == "view0":
            self.emit(f"{x.name}[0].mul_(3.0)")
        else:
            self.emit(f"{x.name}.view(-1).add_(1.0)" if x.contig else f"{x.name}.mul_(0.5)")
        return True

    def op_nograd_write(self) -> bool:
        leaves = [v for v in self.vars if v.leaf and v.name in self.leaf_names]
        if not leaves:
            return False
        p = self.rng.choice(leaves)
        c = self.rng.choice(["add_", "mul_", "sgd", "view", "setitem", "viewvar"])
        if c == "add_":
            s = f"{p.name}.add_(0.1)"
        elif c == "mul_":
            s = f"{p.name}.mul_(0.9)"
        elif c == "sgd":
            s = f"if {p.name}.grad is not None:\n        {p.name}.sub_(0.1 * {p.name}.grad)"
        elif c == "view":
            s = f"{p.name}.view(-1)[0].add_(1.0)"
        elif c == "setitem":
            s = f"{p.name}[0] = 0.25"
        else:
            views = [v for v in self.vars if v.base == p.name and not v.overlap]
            s = f"{self.rng.choice(views).name}.mul_(0.5)" if views else f"{p.name}.sub_(0.05)"
        self.emit("with torch.no_grad():\n    " + s)
        return True

    def op_root(self) -> bool:
        x = self.pick(lambda v: len(v.shape) >= 1, prefer_rg=0.9)
        if x is None:
            return False
        y = self.pick(lambda v: v.shape == x.shape and v is not x)
        if y is not None and self.rng.random() < 0.4:
            v = self.new((), self.promote(x, y), x.rg or y.rg)
            self.emit(f"{v.name} = ({x.name} * {y.name}).{self.rng.choice(['sum', 'mean'])}()")
        else:
            v = self.new((), x.dtype, x.rg)
            self.emit(f"{v.name} = {x.name}.{self.rng.choice(['sum', 'mean'])}()")
        return True

    # -- backward calls
    def op_backward(self) -> bool:
        rng = self.rng
        scalars = [v for v in self.vars if v.shape == () and not v.leaf]
        root = self.pick(lambda v: v.shape == () and not v.leaf, prefer_rg=0.9) if scalars else None
        if root is None:
            return False
        retain = rng.random() < 0.7
        rk = ", retain_graph=True" if retain else rng.choice(["", "", ", retain_graph=False"])
        rg_leaves = [v.name for v in self.vars if v.leaf and v.rg and v.name in self.leaf_names]
        c = rng.choices(["backward", "inputs", "grad", "nonscalar", "sum2", "multi"], [5, 2, 3, 2, 1, 1])[0]
        if c == "inputs" and rg_leaves:
            inputs = sorted(rng.sample(rg_leaves, min(len(rg_leaves), rng.choice([1, 2]))))
            self.emit(f"{root.name}.backward(inputs=[{', '.join(inputs)}]{rk})")
        elif c == "grad" and rg_leaves:
            cands = rg_leaves + [v.name for v in self.vars if v.rg and not v.leaf and v.shape != ()][-3:]
            inputs = sorted(set(rng.sample(cands, min(len(cands), rng.choice([1, 2])))))
            au = ", allow_unused=True" if rng.random() < 0.95 else ""
            self.emit(f"g{self.ng} = torch.autograd.grad({root.name}, [{', '.join(inputs)}]{rk}{au})")
            self.ng += 1
        elif c == "nonscalar":
            x = self.pick(lambda v: len(v.shape) >= 1 and not v.leaf, prefer_rg=0.9)
            if x is None:
                return False
            if rng.random() < 0.08:  # PyTorch's own "grad can be implicitly created only for scalar outputs"
                self.emit(f"{x.name}.backward({rk[2:]})")
            else:
                self.emit(f"{x.name}.backward(gradient=torch.full_like({x.name}, 0.5){rk})")
        elif c == "sum2":
            other = self.pick(lambda v: v.shape == () and not v.leaf and v is not root, prefer_rg=0.9)
            if other is None:
                return False
            self.emit(f"({root.name} + {other.name}).backward({rk[2:]})")
        elif c == "multi":
            other = self.pick(lambda v: v.shape == () and not v.leaf and v is not root, prefer_rg=0.9)
            if other is None:
                return False
            self.emit(f"torch.autograd.backward([{root.name}, {other.name}]{rk})")
        else:
            self.emit(f"{root.name}.backward({rk[2:]})")
        return True

    def generate(self) -> Program:
        rng = self.rng
        nleaves = rng.randint(2, 5)
        setup = [f"torch.manual_seed({self.seed})"]
        self.leaf_names: list[str] = []
        for i in range(nleaves):
            name = "abcde"[i]
            shape = rng.choice(SHAPES)
            dtype = rng.choice(["float32", "float64"])
            rg = rng.random() < (0.7 if i else 0.95)
            args = ", ".join(str(s) for s in shape)
            rgs = ", requires_grad=True" if rg else ""
            setup.append(f"{name} = torch.randn({args}, dtype=torch.{dtype}{rgs})")
            v = Var(name, shape, dtype, rg, True)
            self.vars.append(v)
            self.by_name[name] = v
            self.leaf_names.append(name)
        total = rng.randint(20, 40)
        nforward = int(total * rng.uniform(0.55, 0.75))
        forward = [
            (self.op_unary, 6), (self.op_binary, 6), (self.op_matmul, 2), (self.op_reduce, 2), (self.op_index, 3),
            (self.op_view, 3), (self.op_cat, 1), (self.op_gather, 1), (self.op_inplace, 1),
            (self.op_nograd_write, 1), (self.op_root, 2),
        ]
        later = [
            (self.op_backward, 8), (self.op_inplace, 1), (self.op_nograd_write, 2), (self.op_root, 1),
            (self.op_unary, 1), (self.op_index, 1),
        ]
        while len(self.body) < total:
            ops = forward if len(self.body) < nforward else later
            fn = rng.choices([f for f, _ in ops], [w for _, w in ops])[0]
            fn()
        return Program(self.seed, setup, self.body, list(self.leaf_names))


def generate(seed: int) -> Program:
    """The program named by ``seed``."""
    return _Gen(seed).generate()


# -- the runner ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Exc:
    type: str
    line: str  # first line of the message
    code: Optional[str] = None  # GradProbeError's finding code

    @classmethod
    def of(cls, e: BaseException) -> Exc:
        finding = getattr(e, "finding", None)
        code = finding.code if isinstance(e, gradprobe.GradProbeError) and finding is not None else None
        text = str(e).strip()
        return cls(type(e).__name__, text.splitlines()[0] if text else "", code)

    def kind(self) -> str:
        for phrase, _, kind in PREDICTED:
            if re.search(phrase, self.line):
                return kind
        return f"{self.type}: {_norm(self.line)}"

    def predicted(self) -> Optional[str]:
        for phrase, code, _ in PREDICTED:
            if re.search(phrase, self.line):
                return code
        return None

    def desc(self) -> str:
        if self.code:
            return f"GradProbeError {self.code}"
        if self.predicted():
            return f"PyTorch's own {self.kind()} error"
        return self.kind()


def _norm(text: str, n: int = 90) -> str:
    text = re.sub(r"0x[0-9a-f]+", "0x?", text)
    text = re.sub(r"\d+", "N", text)
    return text[:n]


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    mode: Optional[str]  # None (untraced), "raise", "record"
    targets: bool = False
    detect: str = "default"


UNTRACED = Variant("untraced", None)
DEFAULT_VARIANTS = (
    Variant("raise/every", "raise"),
    Variant("raise/targets", "raise", targets=True),
    Variant("record/every", "record"),
    Variant("record/targets", "record", targets=True),
)
ALL_VARIANTS = (
    Variant("raise/every/detect=all", "raise", detect="all"),
    Variant("record/every/detect=all", "record", detect="all"),
)


@dataclasses.dataclass
class Run:
    outcomes: list[Optional[Exc]]
    grads: list[Any]  # per leaf: None, a tensor, or "nonleaf"
    values: list[torch.Tensor]
    grad_results: list[Any]  # per g<k> variable: tuple of tensors/None, or "missing"
    findings: list[tuple[str, str, str]]  # (code, severity, for GP000: which plugin crashed where)
    exit_exc: Optional[Exc]
    leftovers: list[str]
    setup_exc: Optional[Exc] = None


def _leftovers(leaves: list[torch.Tensor]) -> list[str]:
    out = []
    if torch._C._len_torch_function_stack() != 0:
        out.append("a TorchFunctionMode is still on the stack")
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is not None and top(False) is not None:
        out.append("saved_tensors_hooks still installed")
    for leaf in leaves:
        if getattr(leaf, "_backward_hooks", None):
            out.append("tensor hooks left on a leaf")
            break
        if getattr(leaf, "_post_accumulate_grad_hooks", None):
            out.append("post-accumulate-grad hooks left on a leaf")
            break
    return out


def _plugin_crash(finding: Any) -> str:
    if finding.code != "GP000":
        return ""
    m = re.search(r"raised (\w+):.* at (\S+?):\d+ in (\w+)", finding.message)
    where = f"{m.group(1)} at {m.group(2).rsplit('/', 1)[-1]} in {m.group(3)}" if m else _norm(finding.message, 80)
    return f"plugin {finding.plugin!r} crashed: {where}"


_FILE_SERIAL = [0]


def run(program: Program, variant: Variant, targets: Optional[list[str]] = None) -> Run:
    """Run ``program`` statement by statement in a fresh namespace, untraced or traced as ``variant`` says."""
    src, starts_setup, starts_body = program.flat_source()
    _FILE_SERIAL[0] += 1
    filename = f"<gradprobe-fuzz seed={program.seed}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)

    def code(stmt: str, start: int) -> Any:
        return compile("\n" * (start - 1) + stmt + "\n", filename, "exec")

    ns: dict[str, Any] = {"__name__": "__gradprobe_fuzz__"}
    exec(compile(PRELUDE, filename, "exec"), ns)
    for stmt, start in zip(program.setup, starts_setup):
        try:
            exec(code(stmt, start), ns)
        except Exception as e:  # a generator bug: nothing to compare
            return Run([], [], [], [], [], None, [], setup_exc=Exc.of(e))
    leaves = [ns[n] for n in program.leaves]
    outcomes: list[Optional[Exc]] = []
    findings: list[tuple[str, str]] = []
    exit_exc = None
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        tr = None
        if variant.mode is not None:
            chosen = [ns[n] for n in (targets or [])] if variant.targets else []
            tr = gradprobe.trace(*chosen, on_finding=variant.mode, detect=variant.detect)
            tr.__enter__()
        raised: Optional[BaseException] = None
        try:
            for stmt, start in zip(program.body, starts_body):
                try:
                    exec(code(stmt, start), ns)
                    outcomes.append(None)
                except Exception as e:
                    outcomes.append(Exc.of(e))
                    if variant.mode == "raise":
                        raised = e
                        break
        finally:
            if tr is not None:
                try:
                    if raised is not None:
                        tr.__exit__(type(raised), raised, raised.__traceback__)
                    else:
                        tr.__exit__(None, None, None)
                except Exception as e:
                    exit_exc = Exc.of(e)
                findings = [(f.code, f.severity, _plugin_crash(f)) for f in tr.findings]
    leftovers = _leftovers(leaves) if tr is not None else []
    grads = [leaf.grad if leaf.is_leaf else "nonleaf" for leaf in leaves]
    values = [leaf.detach().clone() for leaf in leaves]
    grad_results = []
    for k in range(len(program.body)):
        name = f"g{k}"
        if not any(s.startswith(name + " = ") for s in program.body):
            continue
        grad_results.append(ns.get(name, "missing"))
    return Run(outcomes, grads, values, grad_results, findings, exit_exc, leftovers)


def _same_tensorish(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_tensorish(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return a == b


def _finite(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all())
    if isinstance(x, (tuple, list)):
        return all(_finite(y) for y in x)
    return True


def reached_leaves(program: Program, base: Run) -> list[str]:
    """Leaves that require grad and got a gradient (``.grad`` or an ``autograd.grad`` result) untraced."""
    out = []
    for name, g in zip(program.leaves, base.grads):
        if isinstance(g, torch.Tensor):
            out.append(name)
    return out


def compare(program: Program, base: Run, variant: Variant, traced: Run) -> list[str]:
    """Mismatch categories of one traced run against the untraced one (empty: it matched)."""
    v = variant.name
    cats: list[str] = []
    if traced.setup_exc is not None:
        return [f"{v}: setup raised {traced.setup_exc.desc()}"]
    if variant.mode == "raise":
        for i, u in enumerate(base.outcomes):
            g = traced.outcomes[i] if i < len(traced.outcomes) else None
            if u is None and g is None:
                continue
            if u is None:
                cats.append(f"{v}: raised on a statement PyTorch runs cleanly: {g.desc()}")
            else:
                expected = u.predicted()
                ok = (g is not None and g.type == "GradProbeError" and g.code == expected) if expected else g == u
                if not ok and expected in ("GP101", "GP302") and g is not None and g.code is None and g.kind() == u.kind() and any(c == "GP103" for c, _, _ in traced.findings):
                    # the documented blind spot (NOTE [CopySlices] in gradprobe/detectors/freed_graph.py):
                    # PyTorch's own error comes through, and gradprobe said where it could not see
                    cats.append(f"{LIMITATION}{v}: {u.kind()} inside an in-place-on-view node, said as GP103 (info)")
                elif not ok:
                    want = f"GradProbeError {expected}" if expected else "PyTorch's own error"
                    cats.append(f"{v}: PyTorch raises {u.kind()}: expected {want}, got {g.desc() if g else 'no error'}")
            break
        clean = all(o is None for o in base.outcomes)
        if clean and traced.exit_exc is not None:
            cats.append(f"{v}: trace exit raised on a clean program: {traced.exit_exc.desc()}")
        elif not clean and traced.exit_exc is not None and not cats:
            cats.append(f"{v}: trace exit raised after an error: {traced.exit_exc.desc()}")
    else:
        first_diff = None
        for i, (u, g) in enumerate(zip(base.outcomes, traced.outcomes)):
            if u == g:
                continue
            if u is not None and g is not None and g.code is not None and RECORD_STAND_INS.get(u.kind()) == g.code:
                continue
            if u is not None and g is not None and g.code is None and u.type == g.type and u.kind() == g.kind() == "inplace":
                # PyTorch's own error, same kind, but its message names another node (observed when a
                # CopySlices node's view grad_fn is regenerated): counted apart, see the closing note
                cats.append(f"{LIMITATION}{v}: PyTorch's in-place message names another node")
                continue
            first_diff = i
            if u is None:
                cats.append(f"{v}: raised on a statement PyTorch runs cleanly: {g.desc()}")
            elif g is None:
                cats.append(f"{v}: PyTorch raises {u.kind()}, traced ran cleanly")
            else:
                cats.append(f"{v}: PyTorch raises {u.kind()}, traced raised {g.desc()}")
            break
        if first_diff is None:
            if not all(_same_tensorish(a, b) for a, b in zip(base.grads, traced.grads)):
                cats.append(f"{v}: final .grad differs")
            elif not all(_same_tensorish(a, b) for a, b in zip(base.values, traced.values)):
                cats.append(f"{v}: final leaf values differ")
            elif not _same_tensorish(base.grad_results, traced.grad_results):
                cats.append(f"{v}: autograd.grad results differ")
        if traced.exit_exc is not None:
            cats.append(f"{v}: trace exit raised: {traced.exit_exc.desc()}")
        if all(o is None for o in base.outcomes) and first_diff is None:
            bad = sorted({code for code, sev, _ in traced.findings
                          if sev in ("warning", "error") and code != "GP000" and code not in ALLOWED_ON_CLEAN})
            for code in bad:
                cats.append(f"{v}: {code} finding on a program PyTorch runs cleanly")
    for crash in sorted({c for _, _, c in traced.findings if c}):
        cats.append(f"{v}: {crash}")
    for left in traced.leftovers:
        cats.append(f"{v}: left installed after the trace: {left}")
    return cats


@dataclasses.dataclass
class Result:
    programs: int = 0
    clean: int = 0
    pytorch_errors: Counter = dataclasses.field(default_factory=Counter)  # first PyTorch error kind
    skipped: Counter = dataclasses.field(default_factory=Counter)
    mismatches: Counter = dataclasses.field(default_factory=Counter)  # category -> programs
    limitations: Counter = dataclasses.field(default_factory=Counter)  # documented blind spots -> programs
    smallest: dict = dataclasses.field(default_factory=dict)  # category -> (size, seed, variant)

    @property
    def failed(self) -> bool:
        return bool(self.mismatches)


def check_program(program: Program, variants: tuple[Variant, ...]) -> tuple[Optional[str], dict[str, Variant]]:
    """Run one program in every variant; returns (skip reason or None, {category: variant})."""
    base = run(program, UNTRACED)
    if base.setup_exc is not None:
        return f"setup raised {base.setup_exc.desc()}", {}
    if not all(_finite(g) for g in base.grads) or not all(_finite(r) for r in base.grad_results):
        return "non-finite gradients (GP601 would be right)", {}
    targets = [n for n in reached_leaves(program, base)]
    out: dict[str, Variant] = {}
    for variant in variants:
        if variant.targets and not targets:
            continue
        traced = run(program, variant, targets)
        for cat in compare(program, base, variant, traced):
            out.setdefault(cat, variant)
    return None, out


def still_fails(program: Program, variant: Variant, category: str) -> bool:
    base = run(program, UNTRACED)
    if base.setup_exc is not None:
        return False
    if not all(_finite(g) for g in base.grads) or not all(_finite(r) for r in base.grad_results):
        return False
    targets = reached_leaves(program, base)
    if variant.targets and not targets:
        return False
    return category in compare(program, base, variant, run(program, variant, targets))


def minimize(program: Program, variant: Variant, category: str, budget: int = 400) -> Program:
    """Delta debugging over statements (body, then leaf lines): the smallest program still in ``category``."""
    trials = [0]

    def ok(p: Program) -> bool:
        trials[0] += 1
        return trials[0] <= budget and still_fails(p, variant, category)

    for part in ("body", "setup"):
        chunk = max(1, len(getattr(program, part)) // 2)
        while chunk >= 1:
            i = 0
            changed = False
            while i < len(getattr(program, part)):
                stmts = getattr(program, part)
                if part == "setup" and i == 0:  # keep torch.manual_seed
                    i += 1
                    continue
                cand_stmts = stmts[:i] + stmts[i + chunk:]
                cand = (program.with_statements(program.setup, cand_stmts) if part == "body"
                        else program.with_statements(cand_stmts, program.body))
                if ok(cand):
                    program = cand
                    changed = True
                else:
                    i += chunk
            if not changed:
                chunk //= 2
            if trials[0] > budget:
                break
    return program


def campaign(seeds: Any, variants: tuple[Variant, ...] = DEFAULT_VARIANTS) -> Result:
    res = Result()
    for seed in seeds:
        program = generate(seed)
        res.programs += 1
        skip, cats = check_program(program, variants)
        if skip:
            res.skipped[skip] += 1
            continue
        base = run(program, UNTRACED)  # cheap; for the statistics
        first = next((o for o in base.outcomes if o is not None), None)
        if first is None:
            res.clean += 1
        else:
            res.pytorch_errors[first.kind()] += 1
        for cat, variant in cats.items():
            if cat.startswith(LIMITATION):
                res.limitations[cat[len(LIMITATION):]] += 1
                continue
            res.mismatches[cat] += 1
            size = len(program.body) + len(program.setup)
            if cat not in res.smallest or size < res.smallest[cat][0]:
                res.smallest[cat] = (size, seed, variant)
    return res


def _trace_args(program: Program, variant: Variant, targets: list[str]) -> str:
    args = [", ".join(targets)] if variant.targets and targets else []
    args.append(f'on_finding="{variant.mode}"')
    if variant.detect != "default":
        args.append(f'detect="{variant.detect}"')
    return ", ".join(args)


def describe(program: Program, variant: Variant, category: str) -> str:
    """The repro: runnable source, with what PyTorch alone does and what the traced run did."""
    base = run(program, UNTRACED)
    targets = reached_leaves(program, base)
    traced = run(program, variant, targets)
    raising = frozenset(i for i, o in enumerate(base.outcomes) if o is not None)
    lines = [f"# {category}", f"# seed {program.seed}, variant {variant.name}"]
    for i, (u, g) in enumerate(zip(base.outcomes, traced.outcomes + [None] * len(base.outcomes))):
        if u is not None or g is not None:
            lines.append(f"#   body[{i}] {program.body[i].splitlines()[0]!r}: PyTorch: "
                         f"{u.desc() if u else 'ok'}; traced: {g.desc() if g else 'ok'}")
    if traced.exit_exc:
        lines.append(f"#   trace exit: {traced.exit_exc.desc()}")
    if traced.findings:
        lines.append(f"#   findings: {traced.findings}")
    return "\n".join(lines) + "\n" + program.repro(_trace_args(program, variant, targets), raising)


def format_result(res: Result, minimized: bool = True, budget: int = 400) -> str:
    out = [
        f"{res.programs} programs: {res.clean} run cleanly under PyTorch, "
        f"{sum(res.pytorch_errors.values())} raise ({dict(res.pytorch_errors.most_common())}), "
        f"skipped {dict(res.skipped)}",
        f"{sum(res.mismatches.values())} mismatches in {len(res.mismatches)} categories (programs per category):",
    ]
    for cat, count in sorted(res.mismatches.items(), key=lambda kv: (-kv[1], kv[0])):
        out.append(f"  {count:5d}  {cat}")
    if res.limitations:
        out.append("documented limitations (not failures):")
        out += [f"  {count:5d}  {cat}" for cat, count in sorted(res.limitations.items())]
    for cat, (_, seed, variant) in sorted(res.smallest.items()):
        program = generate(seed)
        if minimized:
            program = minimize(program, variant, cat, budget)
        out.append("\n" + "-" * 100 + "\n" + describe(program, variant, cat))
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--all", action="store_true", help="the detect='all' variants instead")
    parser.add_argument("--no-minimize", action="store_true")
    parser.add_argument("--show", type=int, help="print the program of this seed and exit")
    args = parser.parse_args(argv)
    if args.show is not None:
        print(generate(args.show).repro())
        return 0
    variants = ALL_VARIANTS if args.all else DEFAULT_VARIANTS
    torch.set_num_threads(1)  # bitwise comparisons: the same kernels in every run
    res = campaign(range(args.start, args.start + args.n), variants)
    print(format_result(res, minimized=not args.no_minimize))
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
