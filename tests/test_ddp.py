"""DistributedDataParallel for real: 2 gloo ranks on CPU, spawned once for the whole module.

The workers (tests/ddp_workers.py) run every scenario in one process group and save plain results;
each test asserts on one behaviour. PyTorch is the oracle: local gradients from plain autograd on
an undistributed copy, DDP's own "Expected to have finished reduction" error for unused parameters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import ddp_workers  # noqa: E402  (tests/ is on sys.path, see conftest.py)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_workers.run_all, args=(ddp_workers.free_port(), str(out)), nprocs=ddp_workers.WORLD)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(ddp_workers.WORLD)]


@pytest.mark.parametrize("scenario", ["plain_stats", "plain_tensors", "bucket_view"])
def test_parts_are_local_and_check_passes(ranks: list[dict[str, Any]], scenario: str) -> None:
    """Each rank's parts equal its local gradients; the Σ check passes against the local .grad, on every rank."""
    for rank in ranks:
        result = rank[scenario]
        for name, row in result["rows"].items():
            assert row["check"] is True, (scenario, name, row)
            assert row["world"] == 2 and "DDP" in row["note"]
            assert row["parts"][0][1] == result["oracle_norms"][name]  # the same tensor, the same norm
            assert row["local_norm"] == result["oracle_norms"][name]
            assert row["parts"][0][2] == pytest.approx(1.0)  # share of the local .grad


@pytest.mark.parametrize("scenario", ["plain_stats", "bucket_view"])
def test_grad_is_the_average_of_the_local_gradients(ranks: list[dict[str, Any]], scenario: str) -> None:
    """.grad after backward is the mean of the ranks' local gradients, and the report's ‖.grad‖ is its norm."""
    for name in ranks[0][scenario]["grads"]:
        mean = (ranks[0][scenario]["oracle"][name] + ranks[1][scenario]["oracle"][name]) / 2
        for rank in ranks:
            grad = rank[scenario]["grads"][name]
            torch.testing.assert_close(grad, mean)
            assert rank[scenario]["rows"][name]["grad_norm"] == pytest.approx(float(grad.norm()), rel=1e-6)


@pytest.mark.parametrize("scenario", ["plain_stats", "plain_tensors", "bucket_view"])
def test_tracing_leaves_ddp_gradients_bitwise_identical(ranks: list[dict[str, Any]], scenario: str) -> None:
    """The same DDP step untraced gives bitwise the same .grad on every rank."""
    assert all(rank[scenario]["bitwise_with_untraced"] for rank in ranks)
    assert all(rank[scenario]["findings"] == [] for rank in ranks)


def test_report_says_which_number_is_which(ranks: list[dict[str, Any]]) -> None:
    """The rank's report has a DDP section: local parts before the all-reduce, .grad the average."""
    report = ranks[1]["plain_stats"]["report"]
    assert "DDP · rank 1 of 2" in report
    assert "LOCAL" in report and "AVERAGE" in report
    assert "before all-reduce" in report


@pytest.mark.parametrize("scenario", ["two_steps", "two_steps_bv"])
def test_second_step_carries_the_average_in(ranks: list[dict[str, Any]], scenario: str) -> None:
    """Without zero_grad, step 2 starts from the all-reduced .grad: carried in, and the check still holds."""
    for rank in ranks:
        for name, row in rank[scenario]["rows"].items():
            assert row["check"] is True, (name, row)
            assert [p[0] for p in row["parts"]] == [1] or [p[0] for p in row["parts"]] == [0, 1]
            # bucket views move when DDP rebuilds its buckets at step 2, so the label there is "modified"
            assert row["carried"] == ("allreduce" if scenario == "two_steps" else "modified")
        assert rank[scenario]["findings"] == []


def test_no_sync_accumulates_locally_then_reduces(ranks: list[dict[str, Any]]) -> None:
    """Under no_sync .grad is local (no DDP note); the next synced backward reduces both local parts."""
    for rank in ranks:
        result = rank["no_sync"]
        for name, row in result["mid"].items():
            assert row["world"] is None and row["check"] is True
        for name, row in result["rows"].items():
            assert row["world"] == 2 and row["check"] is True
            assert [p[0] for p in row["parts"]] == [0, 1]
            assert row["local_norm"] == pytest.approx(result["oracle_norms"][name], rel=1e-6)
            assert math.fsum(p[2] for p in row["parts"]) == pytest.approx(1.0)


def test_gather_merges_ranks_on_rank_zero(ranks: list[dict[str, Any]]) -> None:
    """gather(dst=0) returns the merged trace on rank 0 only; parts differ per rank, .grad agrees."""
    assert ranks[1]["plain_stats"]["merged"] is None
    merged, text, disagreements = ranks[0]["plain_stats"]["merged"]
    assert merged["world"] == 2 and disagreements == 0
    for leaf in merged["leaves"]:
        norms = leaf["parts"][0]
        assert norms == [ranks[r]["plain_stats"]["rows"][leaf["name"]]["parts"][0][1] for r in (0, 1)]
        assert norms[0] != norms[1]  # each rank has its own batch
        assert leaf["grad_norms"][0] == leaf["grad_norms"][1]
    assert "merged over 2 ranks" in text and "✓" in text and "spread" in text


def test_gather_flags_ranks_that_disagree(ranks: list[dict[str, Any]]) -> None:
    """A rank that rescales .grad after the all-reduce: the merged report names the leaf (GP722)."""
    merged, text, disagreements = ranks[0]["desync"]["merged"]
    assert disagreements == ["ddp.module.head_a.weight"]
    assert [f["code"] for f in merged["findings"]] == ["GP722"]
    assert "✗" in text
    assert ranks[1]["desync"]["rows"]["ddp.module.head_a.weight"]["check"] is False
    assert ranks[0]["desync"]["rows"]["ddp.module.head_a.weight"]["check"] is True


def test_unused_parameters_named_before_ddp_raises(ranks: list[dict[str, Any]]) -> None:
    """GP721 names the parameters and DDP's indices at the backward; DDP's own error at the next forward agrees."""
    for r, rank in enumerate(ranks):
        result = rank["unused"]
        assert result["error"] is not None and "Expected to have finished reduction" in result["error"]
        (code, message, data, site), = [f for f in result["findings"] if f[0] == "GP721"]
        assert data["parameters"] == ["ddp.module.head_b.weight", "ddp.module.head_b.bias"]
        assert data["indices"] == result["error_indices"] == [4, 5]
        assert data["loss"] == "loss_a" and data["rank"] == r
        assert "ddp.module.head_b" in message and "find_unused_parameters" in message
        assert site.filename.endswith("ddp_workers.py") and "loss_a.backward()" in site.source
        assert all(row["world"] is None for row in result["rows"].values())  # no all-reduce finished


def test_unused_parameters_clean_twin(ranks: list[dict[str, Any]]) -> None:
    """With find_unused_parameters=True the same step is fine: no GP721, no DDP error.

    head_b still gets no gradient, which the generic unreached detector (GP503) truly reports.
    """
    for rank in ranks:
        codes = [f[0] for f in rank["unused_clean"]["findings"]]
        assert codes == ["GP503"] and rank["unused_clean"]["error"] is None
