"""A user's own checkpoint and data, end to end: a tiny random-weight LLaVA in
llava-hf/llava-1.5-7b-hf's exact layout (docs/own-checkpoint.md), a pool, images and annotations
in folders outside the repository, `dvc repro` in a copy of the project through evaluate; and the
parts that differ from the demo's own models: the structured-content chat template, BOS, left
padding, 576 image tokens."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align2llava.models.chat import (
    CHATML_TEMPLATE,
    needs_bos,
    prompt_messages,
    render,
    reply_lead,
    takes_structured_content,
    to_messages,
)
from align2llava.steps.finetune.data import IGNORE_INDEX, encode_record
from tests.conftest import ROOT, TINY_WORLD, llava_record, make_image

DVC = Path(sys.executable).parent / "dvc"
# SmolLM2-135M-Instruct's own template, which the demo's base model carries (plain-string content)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def llava15(tmp_path_factory) -> Path:
    from align2llava.models.build import build_llava_hf_like

    return build_llava_hf_like(tmp_path_factory.mktemp("llava15") / "llava-1.5-7b-hf-tiny")


@pytest.fixture(scope="session")
def llava15_loaded(llava15):
    from align2llava.models.loading import load_mllm

    return load_mllm(llava15, dtype="float32")


def _records():
    return [
        llava_record("r0", "a.png", turns=[("What color is the shape?", "It is red."),
                                            ("And its shape?", "A circle, near the top.")]),
        llava_record("r1", "b.png", turns=[("Describe the image in detail.", "A blue shape on a light background.")]),
        llava_record("r2", None, turns=[("Is there a triangle?", "No, there is no triangle.")]),
    ]


# ---------------------------------------------------------------------------- the layout


def test_tiny_checkpoint_has_llava15_layout_and_config(llava15, llava15_loaded):
    from align2llava.models.chat import image_token_count

    names = {p.name for p in llava15.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "preprocessor_config.json",
            "processor_config.json", "chat_template.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json"} <= names
    assert len([n for n in names if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)]) >= 2
    cfg = json.loads((llava15 / "config.json").read_text())
    assert (cfg["vision_feature_layer"], cfg["vision_feature_select_strategy"], cfg["projector_hidden_act"]) == (
        -2, "default", "gelu")
    assert (cfg["vision_config"]["image_size"], cfg["vision_config"]["patch_size"]) == (336, 14)
    assert json.loads((llava15 / "preprocessor_config.json").read_text())["image_processor_type"] == "CLIPImageProcessor"
    tok_cfg = json.loads((llava15 / "tokenizer_config.json").read_text())
    assert tok_cfg["padding_side"] == "left" and tok_cfg["add_bos_token"] is True
    added = json.loads((llava15 / "added_tokens.json").read_text())
    assert set(added) == {"<image>", "<pad>"} and cfg["image_token_index"] == added["<image>"]
    model, proc = llava15_loaded
    assert image_token_count(proc) == 576
    tok = proc.tokenizer
    assert tok.padding_side == "left" and tok("a")["input_ids"][0] == tok.bos_token_id
    assert takes_structured_content(tok, proc.chat_template)
    assert "{% generation %}" in json.loads((llava15 / "chat_template.json").read_text())["chat_template"]


# ---------------------------------------------------------------------------- templates


def test_structured_template_renders_llava15_prompts(llava15_loaded):
    _, proc = llava15_loaded
    msgs = to_messages(_records()[0])
    assert render(proc, msgs) == ("USER: <image>\nWhat color is the shape? ASSISTANT: It is red. "
                                  "USER: And its shape? ASSISTANT: A circle, near the top. ")
    prompt = render(proc, prompt_messages("<image>\nWhat is it?", "Answer briefly."), True)
    assert prompt == "USER: <image>\nWhat is it?\nAnswer briefly. ASSISTANT:"
    assert needs_bos(proc.tokenizer, prompt) and reply_lead(proc) == " "


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, SMOLLM2_TEMPLATE], ids=["tiny-chatml", "smollm2"])
def test_demo_templates_render_and_encode_as_before(tiny_llava, template):
    """The demo's templates take plain strings: rendering and finetune's ids and labels are those
    of the code before structured content (image expanded in the message, then rendered)."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_llava))
    proc.chat_template = proc.tokenizer.chat_template = template
    assert not takes_structured_content(proc.tokenizer, template)
    assert reply_lead(proc) == "" and not needs_bos(proc.tokenizer, render(proc, to_messages(_records()[0])))
    n = 17
    for rec in _records():
        msgs = to_messages(rec)
        for gen in (False, True):
            assert render(proc, msgs, gen) == proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        ids, labels, problem = encode_record(rec, proc, n, 512)
        assert problem is None
        assert (ids, labels) == _encode_before(rec, proc, n)


def _encode_before(rec, proc, n):
    """finetune's encoding as it was: image token expanded in the first message, then rendered."""
    from align2llava.models.chat import assistant_spans

    msgs = to_messages(rec)
    if rec.get("image") is not None:
        msgs[0]["content"] = msgs[0]["content"].replace("<image>", "<image>" * n, 1)
    text, spans = assistant_spans(proc, msgs)
    enc = proc.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [IGNORE_INDEX] * len(enc["input_ids"])
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and any(a <= s < b for a, b in spans):
            labels[i] = enc["input_ids"][i]
    return enc["input_ids"], labels


def test_finetune_labels_are_exactly_the_assistant_spans(llava15_loaded):
    """Under llava-hf's template: BOS first, 576 image tokens, and the labelled tokens decode to
    each answer followed by </s> (the template has no end-of-turn token; LLaVA-1.5 trains one)."""
    _, proc = llava15_loaded
    tok = proc.tokenizer
    for rec in _records():
        ids, labels, problem = encode_record(rec, proc, 576, 1024)
        assert problem is None
        assert ids[0] == tok.bos_token_id and ids.count(proc.image_token_id) == (576 if rec.get("image") else 0)
        runs, cur = [], []
        for lab in labels + [IGNORE_INDEX]:
            if lab != IGNORE_INDEX:
                cur.append(lab)
            elif cur:
                runs.append(tok.decode(cur).strip())
                cur = []
        answers = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
        assert runs == [a + tok.eos_token for a in answers]
        assert all(lab == IGNORE_INDEX or lab == t for t, lab in zip(ids, labels))


def test_restyle_and_evaluate_prompt_through_the_checkpoint_template(llava15, llava15_loaded, tmp_path, monkeypatch):
    from align2llava.steps.evaluation.evaluation import Item, generate_answers
    from align2llava.steps.restyle.llm import InnerLLM, review_messages, rewrite_messages

    llm = InnerLLM(llava15, dtype="float32", batch_size=2)
    prompt = llm.chat(rewrite_messages("What color is it?", "It is red."))
    assert prompt.startswith("You are a helpful assistant.") and prompt.endswith(
        "Question: What color is it?\nAnswer: It is red. ASSISTANT:")
    assert "USER: Rewrite the answer" in prompt and "ASSISTANT: The man holds an umbrella" in prompt
    assert llm.prompt_ids(prompt)[0] == llm.tok.bos_token_id and llm.reply_lead == " "
    review = llm.chat(review_messages("Q?", "A one.", "B two."))
    assert "USER: Question: Q?" in review and review.endswith("Reply with A or B. ASSISTANT:")
    # a prefilled "Yes" and what follows keep their space (SentencePiece drops it decoding alone)
    head = llm.tok("ASSISTANT: Yes", add_special_tokens=False).input_ids
    full = llm.tok("ASSISTANT: Yes it is", add_special_tokens=False).input_ids
    assert full[: len(head)] == head and llm.continuation(head[-1], full[len(head):]) == " it is"
    out = llm.generate([prompt, review], [3, 3])
    assert len(out) == 2 and all(o["tokens"] <= 3 for o in out)
    assert len(llm.choice_logits([review, prompt], ("A", "B"))) == 2

    model, proc = llava15_loaded
    make_image(tmp_path / "a.png")
    items = [Item("q0", "eval", "eval", "What color is it?", ["red"], "a.png"),
             Item("q1", "eval", "eval", "Is there a circle? Say yes or no please.", ["yes"], "a.png")]
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw) or real(**kw))
    answers = generate_answers(model, proc, items, image_root=tmp_path, batch_size=2, max_new_tokens=3,
                               instruction="")
    assert len(answers) == 2
    tok = proc.tokenizer
    for it, ids, mask in zip(items, seen[0]["input_ids"].tolist(), seen[0]["attention_mask"].tolist()):
        real_ids = [t for t, m in zip(ids, mask) if m]
        assert mask[-1] == 1 and real_ids[0] == tok.bos_token_id  # left padded, BOS first
        assert real_ids.count(proc.image_token_id) == 576
        text = tok.decode(real_ids, skip_special_tokens=True)
        assert text.replace(" ", "").startswith("USER:") and text.endswith(f"\n{it.question} ASSISTANT:")
    text = render(proc, prompt_messages(items[0].question, "", True), True)
    assert text == "USER: <image>\nWhat color is it? ASSISTANT:" and needs_bos(proc.tokenizer, text)


def test_reward_model_reads_the_last_token_under_left_padding(llava15, tmp_path):
    """llava-hf's tokenizer pads on the left: the reward is still read at each row's last real
    token, and an item scores the same alone, in a right-padded batch and in a left-padded one."""
    import torch

    from align2llava.models.reward_model import Encoder, last_token_index, score_items
    from align2llava.steps.reward_training.train import TrainRewardParams, build_reward_model

    assert last_token_index(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])).tolist() == [3, 3, 1]
    params = TrainRewardParams(lora_r=4, lora_alpha=8, lora_dropout=0.0, dtype="float32", layers_to_transform=None,
                               max_length=640)
    rm, proc = build_reward_model(llava15, params)
    assert proc.tokenizer.padding_side == "left"
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.head.weight)
    make_image(tmp_path / "a.png")
    enc = Encoder(proc, 640, tmp_path)
    items = [("What color is the shape?", "a.png"), ("Question: What?\nAnswer: A red circle near the top left of it.", "a.png"),
             ("Is it red?", None)]
    alone = [score_items(rm, enc, [it], batch_size=1)[0] for it in items]
    together = score_items(rm, enc, items, batch_size=3)
    assert together == pytest.approx(alone, abs=1e-4)
    assert len(set(round(a, 3) for a in alone)) == 3  # the head reads different states
    # the same batch padded on the left, as the tokenizer would
    right = enc.batch([(enc.ids(t, im is not None), im) for t, im in items])
    lengths = right["attention_mask"].sum(1)
    width = right["input_ids"].shape[1]
    left = {"input_ids": torch.full_like(right["input_ids"], enc.pad_id), "attention_mask": torch.zeros_like(right["attention_mask"])}
    for r, n in enumerate(lengths.tolist()):
        left["input_ids"][r, width - n:] = right["input_ids"][r, :n]
        left["attention_mask"][r, width - n:] = 1
    left["pixel_values"] = right["pixel_values"]
    with torch.no_grad():
        assert rm(**left).tolist() == pytest.approx(alone, abs=1e-4)


# ---------------------------------------------------------------------------- end to end

COLORS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 160, 30), "yellow": (220, 200, 20),
          "gray": (128, 128, 128), "teal": (20, 140, 140)}


def write_user_data(root: Path) -> dict[str, Path]:
    """What a user brings, outside the repository: images in their own folders, a pool (JSONL,
    LLaVA-Instruct style ids, no task field), annotations in the released format, an eval set."""
    names = list(COLORS)
    for k, name in enumerate(names):
        make_image(root / "images" / "coco" / f"{k:04d}.png", color=COLORS[name], size=(40, 40))
    pool = []
    for i in range(12):
        k = i % len(names)
        turns = [("What color is the shape?", f"The shape is {names[k]}.")]
        if i % 3 == 0:
            turns.append(("Where is it?", "It is in the middle of the image."))
        pool.append(llava_record(f"{i:012d}", f"coco/{k:04d}.png", turns=turns))
    questions, answers = [], []
    for k in range(4):
        image = f"coco/{k:04d}.png"
        questions.append({"id": f"q{k}", "image": image, "score": [1.0, 0.5, 0.0], "questions": [
            ["<image>\nWhat color is the shape?"], ["<image>\nWhat is shown?"], ["<image>\nIs it a nice day?"]]})
        answers.append({"id": f"a{k}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"},
            {"from": "gpt", "value": [f"The shape is {names[k]}.", "The shape is purple.", "I cannot tell."],
             "score": [1.0, 0.25, 0.0]}]})
    evals = [llava_record(f"e{k}", f"coco/{k:04d}.png", turns=[("What color is the shape?", names[k])])
             for k in range(4)]
    files = {"pool": root / "data" / "pool.jsonl", "questions": root / "annotations" / "question.json",
             "answers": root / "annotations" / "answer.json", "input": root / "annotations" / "labelstudio.json",
             "eval": root / "data" / "eval.json"}
    for f in files.values():
        f.parent.mkdir(parents=True, exist_ok=True)
    files["pool"].write_text("".join(json.dumps(r) + "\n" for r in pool))
    files["questions"].write_text(json.dumps(questions))
    files["answers"].write_text(json.dumps(answers))
    files["input"].write_text("[]")  # not read with format align2llava; every annotation path is a dep
    files["eval"].write_text(json.dumps(evals))
    return {**files, "images": root / "images"}


def user_params(params: dict, user: dict[str, Path], checkpoint: Path) -> dict:
    """params.yaml as docs/own-checkpoint.md tells a user to set it, sized down to a CI run."""
    p = params
    p["base"].update(pool=str(user["pool"]), image_root=str(user["images"]))
    p["pretrain"]["checkpoint"] = str(checkpoint)
    p["instruct"]["checkpoint"] = str(checkpoint)  # instruction-tuned already: the reward models' base too
    p["synthesize"].update(TINY_WORLD)
    p["annotate_import"].update(format="align2llava", questions=str(user["questions"]),
                                answers=str(user["answers"]), input=str(user["input"]), val_fraction=0.25)
    p["train_reward"].update(layers_to_transform=None, lora_r=4, lora_alpha=8, max_length=640,
                             num_train_epochs=1, per_device_train_batch_size=8, per_device_eval_batch_size=8)
    p["score"].update(batch_size=8)
    p["select"].update(question_keep_ratio=0.5, keep_ratio=0.5)
    p["restyle"].update(batch_size=1, max_new_tokens=8)  # one update per record: an ETA line
    p["finetune"].update(layers_to_transform=None, lora_r=4, lora_alpha=8, max_length=700, max_steps=2,
                         per_device_train_batch_size=2)
    p["evaluate"].update(vqa_file=None, pope_file=None, eval_file=str(user["eval"]),
                         eval_image_root=str(user["images"]), batch_size=2, max_new_tokens=4)
    return p


def copy_project(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@pytest.mark.skipif(not DVC.exists(), reason="dvc not installed next to this python")
def test_own_checkpoint_and_data_end_to_end(llava15, tmp_path):
    """`dvc repro` in a copy of the project, as a user runs it, with the llava-1.5-7b-hf-layout
    checkpoint (pretrain.checkpoint) and a pool, images and annotations outside the repository."""
    user = write_user_data(tmp_path / "user")
    repo = copy_project(tmp_path / "project")
    params = user_params(yaml.safe_load((repo / "params.yaml").read_text()), user, llava15)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # progress lines at every update; no MLflow (3 s a stage; tracking is tested on its own)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "ALIGN2LLAVA_PROGRESS_SECONDS": "0", "ALIGN2LLAVA_NO_MLFLOW": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(DVC), "repro"], cwd=repo, env=env, capture_output=True, text=True)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    ran = {line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])

    # the reward models name their backbone relative to their folder, with its fingerprint
    meta = json.loads((repo / "models/train_reward/question/reward_config.json").read_text())
    assert meta["backbone"] == "../../instruct" and len(meta["backbone_fingerprint"]) == 64
    scores = [json.loads(line) for line in (repo / "data/score/scores.jsonl").read_text().splitlines()]
    assert len(scores) == 12 and all(r["question_score"] != 0.0 for r in scores)
    curated = json.loads((repo / "data/restyle/curated.json").read_text())
    pool_ids = [json.loads(line)["id"] for line in user["pool"].read_text().splitlines()]
    assert len(curated) == 3 and {r["id"] for r in curated} <= set(pool_ids)
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    assert metrics["eval_count"] == 4 and 0.0 <= metrics["eval_vqa_accuracy"] <= 1.0
    finetune = json.loads((repo / "metrics/finetune.json").read_text())
    assert finetune["steps"] == 2 and finetune["train_records"] == 3
    # every long step reports progress with units and an ETA
    for desc, unit in [("train question RM", "steps"), ("train answer RM", "steps"), ("score", "items"),
                       ("rewrite", "rec"), ("finetune", "steps"), ("generate", "q")]:
        lines = [x for x in log.splitlines() if re.search(rf"{desc}: [\d,]+/[\d,]+ {unit} \(\d+%\) in \d+ s, ", x)]
        assert lines and all(f" {unit}/s" in x for x in lines), desc
        if desc != "train answer RM":
            assert any("ETA" in x for x in lines), desc
    # nothing is left stale: a second repro runs nothing
    again = subprocess.run([str(DVC), "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout


# ---------------------------------------------------------------------------- reward models travel


def _dvc(env, cwd, *args):
    out = subprocess.run([str(DVC), *args] if args[0] != "git" else list(args), cwd=cwd, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, f"{args}: {out.stdout}{out.stderr}"
    return out.stdout


@pytest.mark.skipif(not DVC.exists(), reason="dvc not installed next to this python")
def test_reward_models_travel_through_a_dvc_remote(tiny_llava, tmp_path, monkeypatch):
    """Push models/pretrain and models/train_reward to a local DVC remote, pull them into a fresh
    clone in another directory, score there from a third working directory: the same scores. A
    different backbone in their place is refused with a clear error."""
    import torch

    from align2llava.errors import DataError
    from align2llava.models.build import build_tiny_llava
    from align2llava.models.reward_model import save_reward_model
    from align2llava.steps.reward_training.train import TrainRewardParams, build_reward_model
    from align2llava.steps.scoring import load_reward_models, score_records

    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "site"),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    team = tmp_path / "team"
    team.mkdir()
    _dvc(env, team, "git", "init", "-q")
    _dvc(env, team, "init", "-q")
    shutil.copytree(tiny_llava, team / "models" / "pretrain")
    images = tmp_path / "images"
    make_image(images / "a.png")
    make_image(images / "b.png", color=(30, 30, 200))
    monkeypatch.chdir(team)  # stages run at the project root
    params = TrainRewardParams(lora_r=4, lora_alpha=8, lora_dropout=0.0, dtype="float32",
                               layers_to_transform=[-1], max_length=64)
    for seed, kind in enumerate(("question", "answer")):
        rm, _ = build_reward_model("models/pretrain", params)
        torch.manual_seed(seed)
        torch.nn.init.normal_(rm.head.weight)
        for n, p in rm.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.3)
        save_reward_model(rm, f"models/train_reward/{kind}", kind=kind, backbone="models/pretrain", max_length=64)
    meta = json.loads(Path("models/train_reward/answer/reward_config.json").read_text())
    assert meta["backbone"] == "../../pretrain"
    records = [llava_record("r0", "a.png"), llava_record("r1", "b.png", turns=[("Shape?", "A square."), ("Size?", "Big.")])]

    def scores(root: Path) -> list:
        m = load_reward_models(root / "models/train_reward/question", root / "models/train_reward/answer",
                               image_root=images, dtype="float32")
        return score_records(m, records, batch_size=2)

    before = scores(team)
    _dvc(env, team, "add", "-q", "models/pretrain", "models/train_reward")
    _dvc(env, team, "remote", "add", "-q", "-d", "shared", str(tmp_path / "remote"))
    _dvc(env, team, "git", "add", "-A")
    _dvc(env, team, "git", "commit", "-qm", "reward models")
    _dvc(env, team, "push", "-q")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _dvc(env, elsewhere, "git", "clone", "-q", str(team), "clone")
    clone = elsewhere / "clone"
    assert not (clone / "models" / "train_reward").exists()
    _dvc(env, clone, "pull", "-q")
    shutil.rmtree(team / "models")  # nothing can be read from the original checkout any more
    monkeypatch.chdir(tmp_path)
    assert scores(clone) == before

    # another checkpoint where the backbone was: refused, naming the fingerprints
    shutil.rmtree(clone / "models" / "pretrain")
    build_tiny_llava(clone / "models" / "pretrain", seed=1)
    with pytest.raises(DataError, match=r"is not the checkpoint this reward model was trained on \(content fingerprint"):
        scores(clone)
    shutil.rmtree(clone / "models" / "pretrain")
    with pytest.raises(DataError, match=r"its backbone .*pretrain \(reward_config.json, relative to the reward-model "
                                        r"folder: \.\./\.\./pretrain\) is not a model folder"):
        scores(clone)
