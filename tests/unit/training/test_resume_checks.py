"""--load refuses another architecture (both values named) and a changed lr schedule unless
Megatron-LM's --override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler says which wins."""

import dataclasses

import pytest
import torch

from megatron_pack.config.spec import CheckpointArgs, ConfigError, OptimArgs
from megatron_pack.model.presets import get_preset
from megatron_pack.training.restore import _schedule_hook, architecture_record, check_architecture
from megatron_pack.training.schedule import build_scheduler


def test_architecture_mismatch_names_both_values():
    tiny = get_preset("tiny")
    saved = {"architecture": architecture_record(tiny, 256)}
    check_architecture(saved, tiny, 256, "--load X")  # negative control: same architecture
    with pytest.raises(ConfigError, match=r"--load X: .*vocab_size 256 in the checkpoint, 512 now \(--vocab-size"):
        check_architecture(saved, tiny, 512, "--load X")
    wider = dataclasses.replace(tiny, hidden_size=128)
    with pytest.raises(ConfigError, match=r"hidden_size 64 in the checkpoint, 128 now \(--model\)"):
        check_architecture(saved, wider, 256, "--load X")


def test_fields_a_checkpoint_predates_are_skipped_and_old_records_use_the_flags():
    tiny = get_preset("tiny")
    rec = architecture_record(tiny, 256)
    rec.pop("rope_theta")  # a field added after the checkpoint was written
    check_architecture({"architecture": rec}, tiny, 256, "w")
    old = {"model": {"model": "tiny", "vocab_size": 256}}  # run_config.json before the record existed
    check_architecture(old, tiny, 256, "w")
    with pytest.raises(ConfigError, match="vocab_size 256 in the checkpoint, 300 now"):
        check_architecture(old, tiny, 300, "w")
    with pytest.raises(ConfigError, match="name 'llama3-8b' in the checkpoint, 'tiny' now"):
        check_architecture({"model": {"model": "llama3-8b"}}, tiny, 256, "w")
    check_architecture(None, tiny, 256, "w")


class _Log:
    def __init__(self):
        self.lines = []

    def print(self, s):
        self.lines.append(s)


def _sched(total, **flags):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return build_scheduler(opt, OptimArgs(lr=1e-3, lr_warmup_iters=1), total, **flags)


def _saved_after(steps, total):
    s = _sched(total, use_checkpoint=True)
    for _ in range(steps):
        s.step(1)
    return s.state_dict()


@pytest.mark.parametrize("mode", ["neither", "override", "use_checkpoint"])
def test_longer_train_iters_on_resume(mode):
    saved = _saved_after(2, total=2)  # the run ended: lr at its minimum
    ck = CheckpointArgs(override_opt_param_scheduler=mode == "override",
                        use_checkpoint_opt_param_scheduler=mode == "use_checkpoint")
    new = _sched(10, override=ck.override_opt_param_scheduler, use_checkpoint=ck.use_checkpoint_opt_param_scheduler)
    log = _Log()
    hook = _schedule_hook(ck, new, "CK", log)
    if mode == "neither":
        with pytest.raises(ConfigError, match=r"--load CK: the lr schedule differs .*decay steps.*checkpoint 2, "
                                              r"command line 10.*--override-opt_param-scheduler"):
            hook(saved)
        return
    hook(saved)
    new.load_state_dict(saved)
    lr = new.optimizer.param_groups[0]["lr"]
    if mode == "override":  # step 2 of a 10-step cosine: well above the minimum
        assert "replaces the checkpoint's" in log.lines[0] and lr > 5e-4
    else:  # the checkpoint's 2-step schedule has ended: the added steps run at min lr (0), said so
        assert "keeping the checkpoint's" in log.lines[0] and "minimum learning rate" in log.lines[0] and lr == 0.0


def test_unchanged_schedule_resumes_silently():
    saved = _saved_after(2, total=6)
    new = _sched(6)
    log = _Log()
    _schedule_hook(CheckpointArgs(), new, "CK", log)(saved)
    new.load_state_dict(saved)
    assert log.lines == [] and new.num_steps == 2


def test_both_scheduler_flags_refused():
    with pytest.raises(ConfigError, match="exclude each other"):
        CheckpointArgs(override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True)


def test_training_setup_checks_token_ids_once_against_the_vocabulary(tmp_path):
    from megatron_pack.config.spec import DataArgs, ModelArgs, TrainArgs, TrainConfig
    from megatron_pack.files.indexed import SFTDatasetWriter
    from megatron_pack.files.indexed_check import DatasetError
    from megatron_pack.training.setup import resolve_vocab_size

    prefix = str(tmp_path / "d")
    with SFTDatasetWriter(prefix) as w:
        w.add([1, 2, 3], [0, 1, 1], [0])
        w.add([4, 300, 5], [0, 1, 1], [0])

    def config(vocab):
        return TrainConfig(model=ModelArgs(vocab_size=vocab), data=DataArgs(data_path=prefix),
                           train=TrainArgs(train_iters=1))

    assert resolve_vocab_size(config(301), get_preset("tiny")) == 301  # negative control
    with pytest.raises(DatasetError, match=r"d.bin: document 1: token id 300 outside the model's vocabulary of 256"):
        resolve_vocab_size(config(256), get_preset("tiny"))


def _config(*flags):
    from megatron_pack.config.cli import parse_args

    return parse_args(["--data-path", "d", "--train-iters", "1", "--seq-length", "64", *flags])


def _saved_run(*flags, plan=True):
    """A checkpoint's run_config.json as train writes it (``plan=False``: before the plan was recorded)."""
    from megatron_pack.data.context_parallel import document_multiple

    cfg = _config(*flags)
    p = cfg.parallel
    rc = dataclasses.asdict(cfg)
    if plan:
        rc["plan"] = {"document_multiple": document_multiple(p.context_parallel_size, p.tensor_model_parallel_size,
                                                             p.sequence_parallel)}
    return rc


def test_resuming_on_another_packing_plan_is_refused_naming_the_flag():
    from megatron_pack.training.restore import check_plan, saved_document_multiple

    cp2 = _saved_run("--context-parallel-size", "2")
    assert saved_document_multiple(cp2) == 4
    with pytest.raises(ConfigError) as e:
        check_plan(cp2, _config(), 1, "--load X")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("--load X: the checkpoint's packing plan pads every document to a multiple of 4 "
                          "(--context-parallel-size 2), this run's to 1 (--context-parallel-size 1)")
    assert "Resume with --context-parallel-size 2" in msg
    check_plan(cp2, _config("--context-parallel-size", "2"), 4, "--load X")  # negative control: same plan
    check_plan(_saved_run(), _config(), 1, "--load X")  # CP1 -> CP1
    # CP 2 -> 4: multiples 4 and 8
    with pytest.raises(ConfigError, match="multiple of 4 .*this run's to 8 "):
        check_plan(cp2, _config("--context-parallel-size", "4"), 8, "--load X")
    # the same CP with a plan padded alike (what --document-padding-multiple gives) resumes: the plan decides
    check_plan(cp2, _config(), 4, "--load X")
    check_plan(None, _config(), 1, "--load X")  # no run_config.json: nothing to compare


def test_checkpoints_from_before_the_plan_was_recorded_use_their_parallel_sizes():
    from megatron_pack.training.restore import check_plan, saved_document_multiple

    old = _saved_run("--context-parallel-size", "2", plan=False)
    assert "plan" not in old and saved_document_multiple(old) == 4
    with pytest.raises(ConfigError, match="multiple of 4 \\(--context-parallel-size 2\\)"):
        check_plan(old, _config(), 1, "--load X")
    assert saved_document_multiple(_saved_run(plan=False)) == 1
    # sequence parallel at CP 2: lcm(2*CP, TP*CP); TP 4 -> 8, and a resume at TP 2 (-> 4) is refused
    sp = _saved_run("--context-parallel-size", "2", "--tensor-model-parallel-size", "4", "--sequence-parallel",
                    plan=False)
    assert saved_document_multiple(sp) == 8
    with pytest.raises(ConfigError, match=r"multiple of 8 \(--context-parallel-size 2 --tensor-model-parallel-size 4 "
                                          r"--sequence-parallel\), this run's to 4"):
        check_plan(sp, _config("--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
                               "--sequence-parallel"), 4, "--load X")
