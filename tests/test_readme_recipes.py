"""The README's real-use commands, run as written on the tiny models: each Hub id the commands name is a
tiny model of that family at the same relative path in a copy of the project, and the GPU launch flags
(fp16) are the only thing replaced, through the launcher's LAUNCH variable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
from conftest import free_port, lora_header, run_script
from PIL import Image
from readme import CPU_LAUNCH, marked_command, place_model, project_copy

pytestmark = pytest.mark.slow

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CAPTIONS = "python generate_captions.py --images_dir images --output_file image_captions.json"
DATASET = (
    "python create_dataset.py --images_dir images --captions_file image_captions.json --dataset_name my_style"
)
RECIPE = f"MODEL_NAME={SD15} DATASET_DIR=datasets/my_style bash train_text_to_image_lora.sh"
GENERATE = (
    f"python -m sdlora.generate --base_model {SD15} --lora_path output/stable-diffusion-v1-5-lora "
    "--prompts validation_prompts.txt"
)
SD21 = "MODEL_NAME=stabilityai/stable-diffusion-2-1 DATASET_DIR=datasets/my_style bash train_text_to_image_lora.sh"
SDXL = (
    "MODEL_NAME=stabilityai/stable-diffusion-xl-base-1.0 VAE_NAME=madebyollin/sdxl-vae-fp16-fix "
    "DATASET_DIR=datasets/my_style bash train_text_to_image_lora.sh"
)
BLIP = 'python generate_captions.py --model_name_or_path Salesforce/blip-image-captioning-large --prefix "sks style,"'
DDP = (
    "accelerate launch --multi_gpu --num_processes 2 train_text_to_image_lora.py --dataset_from_disk "
    "--dataset_disk_path datasets/Text2Image_example --max_train_steps 20 --output_dir output/ddp"
)
TWO_MACHINES = (
    "accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --num_processes 2 --main_process_ip "
    "127.0.0.1 --main_process_port 29500 train_text_to_image_lora.py --dataset_from_disk --dataset_disk_path "
    "datasets/Text2Image_example --max_train_steps 20 --output_dir output/two-machines"
)
DREAMBOOTH = marked_command("dreambooth")

RUN_BY = {
    DREAMBOOTH: "test_the_dreambooth_command",
    CAPTIONS: "test_the_gpu_workflow_runs_as_written_on_tiny_models",
    DATASET: "test_the_gpu_workflow_runs_as_written_on_tiny_models",
    RECIPE: "test_the_gpu_workflow_runs_as_written_on_tiny_models",
    GENERATE: "test_the_gpu_workflow_runs_as_written_on_tiny_models",
    BLIP: "test_the_gpu_workflow_runs_as_written_on_tiny_models",
    SD21: "test_the_sd2_and_sdxl_recipes",
    SDXL: "test_the_sd2_and_sdxl_recipes",
    DDP: "test_several_processes_and_machines",
    TWO_MACHINES: "test_several_processes_and_machines",
}


# The recipes run with their own flags as written, their 500 steps cut to 20 (appended, so the later
# --max_train_steps wins).
SHORT = "--max_train_steps 20 --checkpointing_steps 20 --validation_epochs 5"


def shell(command: str, root, env: dict | None = None, timeout: int = 900):
    result = run_script(["bash", "-c", command], cwd=root, env=env, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def copy_with_models(tmp_path_factory, tiny_model):
    """A project copy holding tiny models under the Hub ids the README names, and the sample dataset."""
    from sdlora.tiny_captioners import save_tiny_captioner
    from sdlora.tiny_model import save_tiny_model

    root = project_copy(tmp_path_factory.mktemp("recipes"))
    place_model(tiny_model, root, SD15)
    place_model(tiny_model, root, "models/tiny-sd")  # what the scripts build on first use
    save_tiny_model(root / "stabilityai" / "stable-diffusion-2-1", family="sd2")
    xl = save_tiny_model(root / "stabilityai" / "stable-diffusion-xl-base-1.0", family="sdxl")
    place_model(xl / "vae", root, "madebyollin/sdxl-vae-fp16-fix")
    save_tiny_captioner("blip2", root / "Salesforce" / "blip2-opt-2.7b")
    save_tiny_captioner("blip", root / "Salesforce" / "blip-image-captioning-large")
    return root


def test_the_gpu_workflow_runs_as_written_on_tiny_models(copy_with_models):
    root = copy_with_models
    (root / "image_captions.json").unlink()  # caption the images afresh, as step 1 does
    shell(CAPTIONS, root)
    captions = json.loads((root / "image_captions.json").read_text())
    assert len(captions) == 48 and all(captions.values())
    shell(DATASET, root)
    # The original recipe with its own flags (batch 1 x 8, 8-bit Adam, lr 1e-4), its 500 steps cut to 20 as
    # the other families' below (its 500 steps took 4 of the suite's minutes and test nothing 20 do not).
    train = shell(f"{RECIPE} {SHORT}", root, env={"LAUNCH": CPU_LAUNCH})
    out = root / "output" / "stable-diffusion-v1-5-lora"
    assert "total optimization steps = 20" in train.stderr
    args = json.loads((out / "args.json").read_text())
    assert (
        args["use_8bit_adam"] and args["gradient_accumulation_steps"] == 8 and args["train_batch_size"] == 1
    )
    assert args["learning_rate"] == 1e-4 and args["report_to"] == "tensorboard"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20"]
    assert lora_header(out)["ss_steps"] == "20"
    shell(GENERATE, root)
    pngs = sorted((root / "results").rglob("image_*.png"))
    assert len(pngs) == 8 and all(Image.open(p).size == (64, 64) for p in pngs)  # 2 prompts x 4 images
    shell(BLIP, root)
    captions = json.loads((root / "image_captions.json").read_text())
    assert len(captions) == 48  # resumed: captions already there are kept


def test_the_sd2_and_sdxl_recipes(copy_with_models):
    root = copy_with_models
    if not (root / "datasets" / "my_style").exists():
        shell(DATASET, root)
    sd2 = shell(f"{SD21} {SHORT}", root, env={"LAUNCH": CPU_LAUNCH})
    assert "resolution = 96" in sd2.stderr
    meta = lora_header(root / "output" / "stable-diffusion-2-1-lora")
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["modelspec.prediction_type"] == "v"
    xl = shell(f"{SDXL} {SHORT}", root, env={"LAUNCH": CPU_LAUNCH})
    assert "resolution = 128" in xl.stderr
    out = root / "output" / "stable-diffusion-xl-base-1.0-lora"
    args = json.loads((out / "args.json").read_text())
    assert (
        args["use_8bit_adam"] and args["gradient_checkpointing"] and args["gradient_accumulation_steps"] == 4
    )
    assert args["pretrained_vae_model_name_or_path"] == "madebyollin/sdxl-vae-fp16-fix"
    assert lora_header(out)["ss_base_model_version"] == "sdxl_base_v1-0"


def test_several_processes_and_machines(copy_with_models):
    root = copy_with_models
    if not (root / "datasets" / "Text2Image_example").exists():
        shell("python create_dataset.py", root)
    # Without GPUs, as the README says: ACCELERATE_USE_CPU=1.
    cpu = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    ddp = shell(DDP, root, env=cpu)
    assert "total batch size (parallel x accumulation) = 32" in ddp.stderr
    # The two-machine command, with its twin for machine 1, both on this host.
    port = str(free_port())
    first = TWO_MACHINES.replace("29500", port)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **cpu}
    twin = subprocess.Popen(
        ["bash", "-c", first.replace("--machine_rank 0", "--machine_rank 1")],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1)
    main = shell(first, root, env=cpu)
    _, twin_err = twin.communicate(timeout=600)
    assert twin.returncode == 0, twin_err[-3000:]
    assert "total batch size (parallel x accumulation) = 32" in main.stderr
    assert (root / "output" / "two-machines" / "pytorch_lora_weights.safetensors").is_file()


def test_the_dreambooth_command(copy_with_models):
    """A folder of photos without captions, class images drawn by the base model, both trained."""
    root = copy_with_models
    subject = root / "subject"
    subject.mkdir()
    for photo in sorted((root / "images").glob("*.png"))[:3]:
        shutil.copy(photo, subject)
    run = shell(DREAMBOOTH, root, env={"OMP_NUM_THREADS": "1"})
    assert len(list((root / "class_images").glob("class_*.png"))) == 100
    out = root / "output" / "sks-dog"
    header = lora_header(out)
    assert header["ss_num_reg_images"] == "100" and header["ss_prior_loss_weight"] == "1.0"
    assert json.loads(header["ss_tag_frequency"])["subject"] == {"a photo of sks dog": 3}
    assert "drew 100 class images" in run.stderr
