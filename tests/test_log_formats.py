"""Training logs written by the real tools: DVCLive, TensorBoard (torch's SummaryWriter),
Lightning's CSVLogger (a real Trainer.fit with LearningRateMonitor); the key table; the order
of sources; and unreadable files named in one line."""

import json
import math

import checkpoint_factory as cf
import pytest
import torch

from pipeline.core.errors import InputError
from pipeline.ingest.discovery import discover
from pipeline.ingest.training_log import read_training_log

LOSS = [2.0, 1.5, 1.25, 1.0]
LR = [1e-3, 8e-4, 6e-4, 4e-4]


def _write_dvclive(run, monkeypatch):
    """HF Trainer's DVCLive names (train/loss, train/learning_rate), one step per log call."""
    from dvclive import Live

    monkeypatch.chdir(run)  # DVCLive writes dvc.yaml beside its folder
    with Live("dvclive", save_dvc_exp=False) as live:
        for loss, lr in zip(LOSS, LR):
            live.log_metric("train/loss", loss)
            live.log_metric("train/learning_rate", lr)
            live.next_step()


def _write_tensorboard(folder, steps, tags=("train/loss", "train/learning_rate")):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as w:
        for s, loss, lr in zip(steps, LOSS, LR):
            w.add_scalar(tags[0], loss, s)
            w.add_scalar(tags[1], lr, s)


def test_dvclive_tsv_per_metric(tmp_path, monkeypatch):
    _write_dvclive(tmp_path, monkeypatch)
    assert (tmp_path / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    log = read_training_log(tmp_path)
    assert log.source == str(tmp_path / "dvclive")
    assert (log.loss_key, log.lr_key) == ("train/loss", "train/learning_rate")
    assert log.step == [0, 1, 2, 3]
    assert log.loss == LOSS and log.learning_rate == LR


def test_dvclive_metrics_json_without_plots(tmp_path):
    live = tmp_path / "dvclive"
    live.mkdir()
    (live / "metrics.json").write_text(json.dumps({"train": {"loss": 0.5}, "lr": 0.01, "step": 7}))
    log = read_training_log(tmp_path)
    assert log.step == [7] and log.loss == [0.5] and log.learning_rate == [0.01]
    assert (log.loss_key, log.lr_key) == ("train/loss", "lr")


def test_tensorboard_hf_layout(tmp_path):
    """HF Trainer logs to runs/<date>_<host>/ with tags train/loss, train/learning_rate; a
    resumed run adds a second folder whose events continue the steps."""
    _write_tensorboard(tmp_path / "runs" / "a_first", [10, 20, 30, 40])
    _write_tensorboard(tmp_path / "runs" / "b_resumed", [40, 50, 60, 70])
    log = read_training_log(tmp_path)
    assert log.source == str(tmp_path / "runs")
    assert (log.loss_key, log.lr_key) == ("train/loss", "train/learning_rate")
    assert log.step == [10, 20, 30, 40, 50, 60, 70]
    # float32 event values; step 40 from the later file (path order)
    assert log.loss == pytest.approx(LOSS[:3] + LOSS, rel=1e-7)
    assert log.learning_rate == pytest.approx(LR[:3] + LR, rel=1e-7)


def test_lightning_csvlogger_real_fit(tmp_path):
    """A real Lightning fit: CSVLogger + LearningRateMonitor write lr-AdamW and train_loss on
    separate rows of the same step; the highest version folder is used."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def training_step(self, batch, _):
            loss = torch.nn.functional.mse_loss(self.lin(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    for max_steps in (3, 12):  # version_0 then version_1
        L.Trainer(
            max_steps=max_steps,
            default_root_dir=str(tmp_path),
            logger=CSVLogger(str(tmp_path)),
            callbacks=[LearningRateMonitor("step")],
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        ).fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=8))
    log = read_training_log(tmp_path)
    assert log.source == str(tmp_path / "lightning_logs" / "version_1" / "metrics.csv")
    assert (log.loss_key, log.lr_key) == ("train_loss", "lr-AdamW")
    assert log.step == list(range(12))
    assert log.learning_rate == pytest.approx([0.1 * 0.5 ** (s // 4) for s in range(12)])
    assert all(math.isfinite(v) and v > 0 for v in log.loss)


@pytest.mark.parametrize(
    "header,loss_key,lr_key",
    [
        ("step,train_loss,lr-SGD", "train_loss", "lr-SGD"),
        ("global_step,train/loss,train/learning_rate", "train/loss", "train/learning_rate"),
        ("step,train_loss_step,lr-Lion", "train_loss_step", "lr-Lion"),
        ("Step,Loss,LR", "Loss", "LR"),
    ],
)
def test_key_table(tmp_path, header, loss_key, lr_key):
    (tmp_path / "log.csv").write_text(f"{header}\n3,0.5,0.01\n")
    log = read_training_log(tmp_path)
    assert (log.loss_key, log.lr_key) == (loss_key, lr_key)
    assert log.step == [3] and log.loss == [0.5] and log.learning_rate == [0.01]


def test_source_order_and_fallthrough(tmp_path, monkeypatch):
    """trainer_state.json beats DVCLive and TensorBoard; a source without any known key (here a
    trainer_state with only eval entries) is skipped, not used empty."""
    _write_dvclive(tmp_path, monkeypatch)
    _write_tensorboard(tmp_path / "runs" / "x", [10, 20, 30, 40])
    cf.write_trainer(tmp_path, [1])
    assert read_training_log(tmp_path).loss_key == "loss"  # trainer_state.json
    hist = {"log_history": [{"step": 1, "eval_loss": 0.3}]}
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text(json.dumps(hist))
    assert read_training_log(tmp_path).source == str(tmp_path / "dvclive")


def test_keys_reach_the_manifest(tmp_path):
    cf.write_flat(tmp_path, [0, 10, 20, 30])
    _write_tensorboard(tmp_path / "tb", [0, 10, 20, 30], tags=("loss", "lr-AdamW"))
    log = discover(tmp_path).runs[0].log
    assert (log.loss_key, log.lr_key) == ("loss", "lr-AdamW") and log.step == [0, 10, 20, 30]


def test_unreadable_event_file_names_it(tmp_path):
    bad = tmp_path / "runs" / "events.out.tfevents.1.host"
    bad.parent.mkdir()
    bad.write_bytes(b"not an event file " * 8)
    with pytest.raises(InputError, match="no readable TensorBoard event") as e:
        read_training_log(tmp_path)
    assert str(bad) in str(e.value)


def test_bad_dvclive_value_names_the_tsv(tmp_path):
    d = tmp_path / "dvclive" / "plots" / "metrics"
    d.mkdir(parents=True)
    (d / "loss.tsv").write_text("step\tloss\n0\t1.0\n1\tnan?\n")
    with pytest.raises(InputError, match="expected a number") as e:
        read_training_log(tmp_path)
    assert "loss.tsv" in str(e.value)


def test_hf_trainer_logs(tmp_path, monkeypatch):
    """A real Hugging Face Trainer run (tiny GPT-2, 4 steps) reporting to TensorBoard and
    DVCLive: trainer_state.json is used first; its TensorBoard log gives the same steps and
    losses under train/loss (not the end-of-training average train/train_loss); its DVCLive
    log counts log calls, not training steps, and its train/loss is the average, so the
    per-step key loss is chosen."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    monkeypatch.chdir(tmp_path)  # HF's DVCLive callback writes ./dvclive
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    ids = torch.randint(0, 64, (32, 16))
    args = TrainingArguments(
        str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_steps=2,
        report_to=["tensorboard", "dvclive"],
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(
        model=model, args=args, train_dataset=[{"input_ids": i, "labels": i} for i in ids]
    ).train()
    state = read_training_log(tmp_path / "out")
    assert state.source.endswith("checkpoint-4/trainer_state.json")
    assert state.step == [1, 2, 3, 4] and (state.loss_key, state.lr_key) == (
        "loss",
        "learning_rate",
    )
    for ckpt in (tmp_path / "out").glob("checkpoint-*"):
        (ckpt / "trainer_state.json").unlink()
    tb = read_training_log(tmp_path / "out")
    assert tb.source.startswith(str(tmp_path / "out" / "runs")) and "tfevents" in tb.source
    assert (tb.loss_key, tb.lr_key) == ("train/loss", "train/learning_rate")
    assert tb.step == state.step
    assert tb.loss == pytest.approx(state.loss, rel=1e-6)
    assert tb.learning_rate == pytest.approx(state.learning_rate, rel=1e-6)
    live = read_training_log(tmp_path)  # ./dvclive
    assert (live.loss_key, live.lr_key) == ("loss", "learning_rate")
    assert live.step == [0, 1, 2, 3] and live.loss == pytest.approx(state.loss, rel=1e-6)
