"""2-process gloo tests of DDP (CPU): training equals one process on the concatenated batch.

One spawned job runs every case (see tests/_dist.py); the reference runs here, in one process.
"""
import pytest
import torch

import sparse_engine as se

from _dist import (EXTRACT_CASE, CASES, extracted_output, CONTROLLER_ACCS, FSDP_CASES, RESUME_CASES, build, controller_alphas, ddp_worker, fsdp_worker,
                   run_case, spawn, tie_scores)

TOL = {torch.float64: 1e-10, torch.float32: 1e-6}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    where = tmp_path_factory.mktemp("ddp")
    return spawn(ddp_worker, 2, where, CASES, str(where))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].is_floating_point()
               else float((a[k] != b[k]).sum()) for k in a)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_ddp_equals_one_process_on_the_concatenated_batch(ddp_results, case):
    r0, r1 = (r["cases"][case] for r in ddp_results)
    # replicas identical, method decisions identical on both ranks
    assert _max_diff(r0["state"], r1["state"]) == 0
    assert r0["alphas"] == r1["alphas"]
    assert r0["resets"] == r1["resets"]
    for name in r0["masks"]:
        assert (r0["masks"][name] is None) == (r1["masks"][name] is None)
        if r0["masks"][name] is not None:
            assert torch.equal(r0["masks"][name], r1["masks"][name])
    one = run_case(case)
    tol = TOL[case[-1]]
    assert _max_diff(r0["state"], one["state"]) <= tol
    if case[0] == "pilot":
        # the α sequence each rank decided (from its own accuracy, averaged inside the library) is the
        # one-process sequence, and the controller did move α
        assert r0["alphas"] == pytest.approx(one["alphas"], rel=1e-12, abs=0)
        assert any(a != 1e-2 for a in r0["alphas"])  # the controller moved α
        for name, mask in one["masks"].items():
            assert torch.equal(r0["masks"][name], mask)
    if case[0] == "signin":
        assert len(r0["resets"]) == len(one["resets"]) > 0
    if case[0].endswith("-rigl"):  # grown by the global batch's gradient: the one-process masks
        assert r0["regrown"] == one["regrown"] > 0
        for name, mask in one["masks"].items():
            assert torch.equal(r0["masks"][name], mask), name


def test_pilot_controller_decides_on_the_mean_accuracy_of_the_ranks(ddp_results):
    mean = [[sum(a) / len(a)] for a in CONTROLLER_ACCS]
    expected = controller_alphas(0, 1, mean)
    assert expected[1] > expected[0]  # the mean accuracy rose: α grows
    for r in ddp_results:
        assert r["controller"] == pytest.approx(expected, rel=1e-12)


def test_user_errors_give_one_clear_line_on_every_rank(ddp_results):
    for r in ddp_results:
        errors = r["errors"]
        for key in ("check_masks", "first_step"):
            assert errors[key] is not None and "differs between ranks" in errors[key] and "\n" not in errors[key]
        assert "DistributedDataParallel" in errors["attach_plain"]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    where = tmp_path_factory.mktemp("fsdp")
    return spawn(fsdp_worker, 2, where, FSDP_CASES, str(where))


@pytest.mark.parametrize("case", FSDP_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_fsdp2_equals_one_process_on_the_concatenated_batch(fsdp_results, case):
    r0, r1 = (r["cases"][case] for r in fsdp_results)
    assert _max_diff(r0["state"], r1["state"]) == 0  # the gathered shards are the same on both ranks
    assert r0["resets"] == r1["resets"]
    one = run_case(case)
    assert _max_diff(r0["state"], one["state"]) <= TOL[case[-1]]
    if case[0] == "signin":
        assert r0["resets"] == pytest.approx(one["resets"], rel=1e-6)  # β mean is summed in float32
    if case[0].startswith(("gmp", "acdc")):  # the prunes' masks: selected over the shards, as one process
        for name, mask in one["masks"].items():
            assert torch.equal(r0["masks"][name], mask) and torch.equal(r1["masks"][name], mask), name
        assert 0 < sum(int(m.sum()) for m in one["masks"].values()) < sum(m.numel() for m in one["masks"].values())
    if case[0].startswith("pilot"):
        # α decided from ‖θ‖₁ summed over the shards; the prune's threshold selected over the shards
        assert r0["alphas"] == r1["alphas"] == pytest.approx(one["alphas"], rel=1e-12, abs=0)
        assert any(a != 1e-2 for a in r0["alphas"])  # the controller moved α
        for name, mask in one["masks"].items():
            assert torch.equal(r0["masks"][name], mask) and torch.equal(r1["masks"][name], mask), name
        kept = sum(int(m.sum()) for m in one["masks"].values())
        assert 0 < kept < sum(m.numel() for m in one["masks"].values())  # it did prune


def test_extract_of_the_gathered_fsdp2_model_equals_the_one_process_model(fsdp_results):
    one = extracted_output(EXTRACT_CASE, run_case(EXTRACT_CASE)["state"])
    for r in fsdp_results:
        torch.testing.assert_close(r["extracted"], one, rtol=0, atol=1e-10)


def test_top_k_selected_over_the_ranks_equals_one_process_with_ties(fsdp_results):
    from sparse_engine.masks import magnitude_masks

    for (seed, k), r0 in fsdp_results[0]["select"].items():
        r1 = fsdp_results[1]["select"][seed, k]
        scores = tie_scores(seed)
        total = sum(t.numel() for t in scores)
        one = magnitude_masks({str(i): t for i, t in enumerate(scores)}, min(k, total) / total, scope="global")
        for i, t in enumerate(scores):
            assert torch.equal(torch.cat([r0[i], r1[i]]), one[str(i)]), (seed, k, i)


def test_fsdp2_nonfinite_gradients_move_nothing_on_any_rank(fsdp_results):
    for r in fsdp_results:
        for mode, got in r["nonfinite"].items():
            assert got["moved"] == [] and got["skipped"] > 0, (mode, got)


def test_a_method_that_cannot_run_sharded_says_so(fsdp_results):
    for r in fsdp_results:
        for name, says in r["refused"].items():
            assert says is not None and "cannot train a sharded" in says and "\n" not in says, (name, says)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_dcp_resume_is_bit_identical_to_the_uninterrupted_run(ddp_results, fsdp_results, wrap):
    results = {"ddp": ddp_results, "fsdp": fsdp_results}[wrap]
    for case in RESUME_CASES[wrap]:
        for r in results:
            whole, resumed = r["cases"][case], r["resumed"][case]
            assert _max_diff(whole["state"], resumed["state"]) == 0, case
            assert whole["alphas"] == resumed["alphas"] and whole["resets"] == resumed["resets"], case


def test_resume_on_another_number_of_processes_is_refused(ddp_results):
    case = RESUME_CASES["ddp"][0]
    run = build(case)  # one process
    where = ddp_results[0]["checkpoints"][case]
    with pytest.raises(ValueError, match="written by 2 processes, this job has 1"):
        se.distributed.load(where, run["wrapped"], run["opt"], run["method"])
