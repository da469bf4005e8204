"""Tiny Florence-2 and LLaVA models with random weights, built offline from configs.

The same classes, processors and folder layout as `florence-community/Florence-2-base` and a llava-hf /
JoyCaption checkpoint (CLIP-style vision tower, Llama language model, Llama 3 chat template), small enough
that a batch takes milliseconds on a CPU. A tiny Qwen2.5-VL cannot be built here: its processor requires a
video processor, which requires torchvision, which does not install beside torch 2.13.0+cpu.
"""

from __future__ import annotations

from .tiny_tokenizers import INIT_RANGE, gpt2_style_tokenizer, seeded

IMAGE_SIZE = 32

# Llama 3's chat format (JoyCaption's language model is Llama 3.1), rendering the content list of a
# multimodal message the way llava-hf templates do: {"type": "image"} becomes the <image> placeholder.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tiny_florence2(seed: int = 0) -> tuple[object, object]:
    """A tiny Florence2ForConditionalGeneration (DaViT vision tower, BART) and its Florence2Processor."""
    from transformers import (
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    tokenizer = gpt2_style_tokenizer(
        {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        add_bos_token=False,
        tokenizer_class=BartTokenizer,
        extra_special_tokens={"image_token": "<image>"},  # the processor reads tokenizer.image_token(_id)
    )
    # Two stages with stride 4 turn 32x32 pixels into 2x2 features; the projector adds one pooled token.
    num_image_tokens = 1 + (IMAGE_SIZE // 16) ** 2
    config = Florence2Config(
        text_config={
            "model_type": "bart",
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 128,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "d_model": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id,  # as in Florence-2: </s> starts the answer
            "forced_eos_token_id": tokenizer.eos_token_id,
            "init_std": INIT_RANGE,
        },
        vision_config={
            "depths": [1, 1],
            "patch_size": [7, 3],
            "patch_stride": [4, 4],
            "patch_padding": [3, 1],
            "patch_prenorm": [False, True],
            "embed_dim": [16, 32],
            "num_heads": [1, 2],
            "num_groups": [1, 2],
            "window_size": 2,
            "projection_dim": 32,
            "drop_path_rate": 0.0,
            "max_position_embeddings": 8,
            "initializer_range": INIT_RANGE,
        },
        image_token_id=tokenizer.image_token_id,
        initializer_range=INIT_RANGE,
    )
    model = seeded(Florence2ForConditionalGeneration, config, seed)
    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        image_seq_length=num_image_tokens,
    )
    # The real checkpoints' processor config names a parser per task kind; captions use the plain-text one.
    processor = Florence2Processor(image_processor, tokenizer, post_processor_config={"pure_text": {}})
    return model, processor


def build_tiny_llava(seed: int = 0) -> tuple[object, object]:
    """A tiny LlavaForConditionalGeneration (CLIP vision tower, Llama) and its LlavaProcessor with a chat template."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = gpt2_style_tokenizer(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "pad_token": "<|finetune_right_pad_id|>",
        },
        add_bos_token=False,  # the chat template writes it
        extra_tokens=("<|start_header_id|>", "<|end_header_id|>", "<image>"),
    )
    patch = 8
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=patch,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=32,
        initializer_range=INIT_RANGE,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=INIT_RANGE,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drops CLIP's class token: one placeholder per patch
    )
    model = seeded(LlavaForConditionalGeneration, config, seed)
    # Real VLMs ship sampling defaults (Qwen2.5-VL, JoyCaption's card); captioning must turn them off itself.
    model.generation_config.update(do_sample=True, temperature=0.7, top_p=0.9)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=LLAMA3_CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the class token, which "default" then drops
    )
    return model, processor
