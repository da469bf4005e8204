#!/usr/bin/env bash
# Train a LoRA with accelerate. Extra arguments pass through to train_text_to_image_lora.py.
#
#   bash train_text_to_image_lora.sh                 # offline demo: built-in tiny model on the CPU, a minute or two
#   MODEL_NAME=stable-diffusion-v1-5/stable-diffusion-v1-5 bash train_text_to_image_lora.sh   # the original recipe on a GPU
set -eu

MODEL_NAME="${MODEL_NAME:-}"
IMAGES_DIR="${IMAGES_DIR:-images}"
CAPTIONS_FILE="${CAPTIONS_FILE:-image_captions.json}"
DATASET_NAME="${DATASET_NAME:-Text2Image_example}"
DATASET_DIR="${DATASET_DIR:-datasets/$DATASET_NAME}"
VALIDATION_PROMPTS="${VALIDATION_PROMPTS:-validation_prompts.txt}"
PYTHON="${PYTHON:-python}"

# Build the dataset from images/ + image_captions.json on first use.
if [ ! -f "$DATASET_DIR/dataset_info.json" ]; then
  "$PYTHON" create_dataset.py --images_dir "$IMAGES_DIR" --captions_file "$CAPTIONS_FILE" \
    --output_dir "$(dirname "$DATASET_DIR")" --dataset_name "$(basename "$DATASET_DIR")"
fi

if [ -z "$MODEL_NAME" ]; then
  # The built-in tiny model, on the CPU: the whole workflow, offline.
  OUTPUT_DIR="${OUTPUT_DIR:-output/tiny-lora}"
  LAUNCH="${LAUNCH:---cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no}"
  RECIPE="--train_batch_size 4 --max_train_steps 200 --learning_rate 1e-3 --lr_scheduler constant
    --checkpointing_steps 100 --validation_epochs 50 --num_validation_images 2 --validation_num_inference_steps 20"
else
  # The original toolkit's recipe: fp16, 8-bit Adam, batch 1 x accumulation 8, 500 steps at 1e-4.
  OUTPUT_DIR="${OUTPUT_DIR:-output/$(basename "$MODEL_NAME")-lora}"
  LAUNCH="${LAUNCH:---mixed_precision fp16 --num_processes 1 --num_machines 1 --dynamo_backend no}"
  RECIPE="--pretrained_model_name_or_path $MODEL_NAME --train_batch_size 1 --gradient_accumulation_steps 8
    --max_train_steps 500 --learning_rate 1e-4 --lr_scheduler constant --lr_warmup_steps 0 --use_8bit_adam
    --checkpointing_steps 500 --validation_epochs 50 --num_validation_images 4"
fi

# --quiet: on a failed run accelerate exits 1 after our one-line error, without a traceback of its own.
# shellcheck disable=SC2086  # LAUNCH and RECIPE are word lists on purpose
"$PYTHON" -m accelerate.commands.launch --quiet $LAUNCH train_text_to_image_lora.py \
  --dataset_from_disk --dataset_disk_path "$DATASET_DIR" --center_crop --random_flip \
  --validation_prompts_dir "$VALIDATION_PROMPTS" --report_to tensorboard --seed 42 \
  $RECIPE --output_dir "$OUTPUT_DIR" "$@"
