#!/usr/bin/env bash
# Train a LoRA with accelerate. Extra arguments pass through to train_text_to_image_lora.py.
#
#   bash train_text_to_image_lora.sh                 # offline demo: the committed tiny-shapes model learns a heart, on the CPU
#   FAMILY=sdxl bash train_text_to_image_lora.sh     # the mechanics on the random tiny SDXL (FAMILY=sd2: the tiny SD 2.x)
#   MODEL_NAME=stable-diffusion-v1-5/stable-diffusion-v1-5 bash train_text_to_image_lora.sh   # the original recipe on a GPU
#   MODEL_NAME=stabilityai/stable-diffusion-xl-base-1.0 VAE_NAME=madebyollin/sdxl-vae-fp16-fix bash train_text_to_image_lora.sh
#   MODEL_NAME=stabilityai/stable-diffusion-3.5-medium bash train_text_to_image_lora.sh   # SD 3.5, bf16
#   RECIPE=my-recipe.toml bash train_text_to_image_lora.sh   # any recipe file (recipes/ holds those above)
set -eu

MODEL_NAME="${MODEL_NAME:-}"
FAMILY="${FAMILY:-}"  # sd1, sd2, sdxl or sd3; read from the model when MODEL_NAME is set
VAE_NAME="${VAE_NAME:-}"  # SDXL: an fp16-safe VAE; without it SDXL's own VAE encodes in fp32 (once, cached)
IMAGES_DIR="${IMAGES_DIR:-images}"
CAPTIONS_FILE="${CAPTIONS_FILE:-image_captions.json}"
DATASET_NAME="${DATASET_NAME:-Text2Image_example}"
DATASET_DIR="${DATASET_DIR:-datasets/$DATASET_NAME}"
VALIDATION_PROMPTS="${VALIDATION_PROMPTS:-validation_prompts.txt}"
PYTHON="${PYTHON:-python}"

if [ -z "$MODEL_NAME" ]; then
  # A built-in tiny model, on the CPU: the whole workflow, offline. SD 1.x: the pretrained tiny-shapes,
  # which learns what images/ shows; SD 2.x and SDXL: random tiny models, for the mechanics.
  case "${FAMILY:-sd1}" in
    sd1) MODEL="tiny-shapes"; OUTPUT_DIR="${OUTPUT_DIR:-output/tiny-lora}"; RECIPE="${RECIPE:-recipes/tiny-shapes.toml}" ;;
    sd2|sdxl) MODEL="tiny-$FAMILY"; OUTPUT_DIR="${OUTPUT_DIR:-output/tiny-$FAMILY-lora}"; RECIPE="${RECIPE:-recipes/tiny.toml}" ;;
    *) echo "error: FAMILY=$FAMILY: use sd1, sd2 or sdxl" >&2; exit 2 ;;
  esac
  # One thread per core not busy with other work (sdlora/cpu.py): every core beside one competing process
  # made a tiny step 3.6x slower, the free cores 0.9x (bench/bench_threads.py, docs/benchmarks.md).
  # OpenMP's default wait is kept: OMP_WAIT_POLICY=PASSIVE made the quiet step 2.8x slower.
  THREADS="${OMP_NUM_THREADS:-$("$PYTHON" -m sdlora.cpu)}"
  LAUNCH="${LAUNCH:---cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process $THREADS}"
  MODEL_FLAGS="--pretrained_model_name_or_path $MODEL"
else
  FAMILY="${FAMILY:-$("$PYTHON" -m sdlora.families "$MODEL_NAME")}"
  OUTPUT_DIR="${OUTPUT_DIR:-output/$(basename "$MODEL_NAME")-lora}"
  LAUNCH="${LAUNCH:---mixed_precision fp16 --num_processes 1 --num_machines 1 --dynamo_backend no}"
  case "$FAMILY" in
    sdxl) RECIPE="${RECIPE:-recipes/sdxl.toml}" ;;
    sd2) RECIPE="${RECIPE:-recipes/sd21.toml}" ;;
    sd3) RECIPE="${RECIPE:-recipes/sd35.toml}" ;;
    *) RECIPE="${RECIPE:-recipes/sd15.toml}" ;;
  esac
  MODEL_FLAGS="--pretrained_model_name_or_path $MODEL_NAME ${VAE_NAME:+--pretrained_vae_model_name_or_path $VAE_NAME}"
fi

# Build the dataset from images/ + image_captions.json on first use (the model's tokenizer counts the
# caption tokens, its native size judges small images).
if [ ! -f "$DATASET_DIR/dataset_info.json" ]; then
  "$PYTHON" create_dataset.py --images_dir "$IMAGES_DIR" --captions_file "$CAPTIONS_FILE" \
    --output_dir "$(dirname "$DATASET_DIR")" --dataset_name "$(basename "$DATASET_DIR")" \
    --pretrained_model_name_or_path "${MODEL_NAME:-$MODEL}"
fi

# --quiet: on a failed run accelerate exits 1 after our one-line error, without a traceback of its own.
# One process: Ctrl-C is ignored by the launcher (the training script takes it again), so the launcher
# waits while the training process saves a checkpoint instead of exiting first with a traceback. Several
# processes: the launcher must see Ctrl-C, as it passes it on to the workers (each in its own session).
case " $LAUNCH " in *" --num_processes 1 "*) trap '' INT ;; esac
# shellcheck disable=SC2086  # LAUNCH and MODEL_FLAGS are word lists on purpose
"$PYTHON" -m accelerate.commands.launch --quiet $LAUNCH train_text_to_image_lora.py --config "$RECIPE" \
  $MODEL_FLAGS --dataset_from_disk --dataset_disk_path "$DATASET_DIR" \
  --validation_prompts_dir "$VALIDATION_PROMPTS" --output_dir "$OUTPUT_DIR" "$@"
