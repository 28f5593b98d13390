import io
import math

import pytest
import torch

from munit_compile import demo

TINY = dict(steps=4, batch=2, seq=8, d_model=16, layers=1, heads=2, eval_every=2, seed=1)


@pytest.fixture(scope="module")
def tiny_results():
    return demo.run_demo(backend="aot_eager", progress=False, **TINY)


def test_run_demo_returns_finite_results(tiny_results):
    r = tiny_results
    assert r["steps"] == 4 and r["backend"] == "aot_eager"
    assert len(r["eager_losses"]) == len(r["munit_losses"]) == 4
    for key in ("eager_train_loss", "munit_train_loss", "eager_val_loss", "munit_val_loss",
                "train_gap_pct", "val_gap_pct", "eager_tokens_per_s", "munit_tokens_per_s",
                "speed_ratio", "eager_first_step_s", "munit_first_step_s", "wall_s"):
        assert math.isfinite(r[key]), key
    assert r["eager_tokens_per_s"] > 0 and r["munit_tokens_per_s"] > 0


def test_same_init_and_batches_give_same_losses(tiny_results):
    # aot_eager runs the same aten ops as eager, so identical init + batch order
    # must reproduce the eager loss curve.
    for eager_loss, compiled_loss in zip(tiny_results["eager_losses"], tiny_results["munit_losses"]):
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)


def test_gemm_counts_without_munit_backend(tiny_results):
    # 4 linears per block + LM head, each with one forward and two backward GEMMs.
    assert tiny_results["total_gemms"] == 3 * (4 * TINY["layers"] + 1)
    assert tiny_results["fp8_forward_linears"] == 0
    assert tiny_results["munit_gemms"] == 0


def test_format_table_lists_every_field(tiny_results):
    table = demo.format_table(tiny_results)
    for label in ("steps", "train loss", "val loss", "tokens/s", "fp8 forward linears",
                  "munit fp8 GEMMs", "all GEMMs", "aot_eager vs eager"):
        assert label in table


def test_count_gemms_counts_linear_once():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    counts = demo.count_gemms(lambda: layer(x).sum().backward())
    # aten::linear (its aten::addmm child is not counted) + two backward aten::mm.
    assert counts == {"fp8_forward_linears": 0, "munit_gemms": 0, "total_gemms": 3}


def test_make_batch_targets_are_shifted_inputs():
    data = torch.arange(100)
    x, y = demo.make_batch(data, torch.tensor([0, 50]), seq=5)
    assert x.tolist() == [[0, 1, 2, 3, 4], [50, 51, 52, 53, 54]]
    assert torch.equal(y, x + 1)


def test_lr_schedule_warms_up_then_decays():
    peak, total = 1.0, 100
    rates = [demo.lr_at(step, total, peak) for step in range(total)]
    assert rates[0] == pytest.approx(0.1)
    assert max(rates) == pytest.approx(peak)
    assert rates[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_corpus_split_is_bytes_with_heldout_tail():
    train, val = demo.load_corpus()
    assert train.dtype == torch.long and int(train.max()) < 256
    assert len(val) == pytest.approx(0.1 * (len(train) + len(val)), abs=1)


def test_progress_bar_redraws_in_place():
    stream = io.StringIO()
    bar = demo.ProgressBar("eager", 2, stream=stream)
    bar.update(1, 3.0, 100.0, 1.0)
    bar.update(2, 2.0, 100.0, 0.0)
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and "2/2" in text and "ETA" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "-1"], "--steps"),
        (["--steps", "abc"], "--steps"),
        (["--d-model", "30", "--heads", "4"], "divisible"),
        (["--lr", "0"], "--lr"),
        (["--eval-every", "-3"], "--eval-every"),
        (["--seq", "100000"], "--seq"),
        (["--backend", "no_such_backend"], "no_such_backend"),
    ],
)
def test_main_rejects_bad_arguments(argv, message, capsys):
    assert demo.main(argv) == 2
    assert message in capsys.readouterr().err


def test_main_prints_table(capsys):
    argv = ["--backend", "aot_eager", "--steps", "2", "--batch", "2", "--seq", "8",
            "--d-model", "16", "--layers", "1", "--heads", "2"]
    assert demo.main(argv) == 0
    captured = capsys.readouterr()
    assert "val loss" in captured.out and "all GEMMs" in captured.out
    assert "2/2" in captured.err
