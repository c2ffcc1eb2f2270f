"""What the released denoisers of the newer families weigh on a GPU, computed on the meta device (no weights, no GPU): each one built from its
released configuration, its parameters counted and checked against the size its makers state, and the memory its weights take in bf16 and
under `base_quantization` (8-bit and nf4 through bitsandbytes), beside the LoRA and its AdamW state at rank 16 on our default layers.

    .venv/bin/python tools/memory_table.py           # the table, as the README's
    .venv/bin/python tools/memory_table.py --json    # one JSON object a line

These are the weights alone: the activations of a batch (which `gradient_checkpointing` trades for compute), the CUDA context and the
allocator's slack come on top, and the text encoders run once, before training, to cache the prompts' embeddings. Measured peaks need a GPU
(`tools/cuda_check.sh`)."""
import argparse, json, sys

# name: (family key, the denoiser's diffusers class, its released configuration (diffusers' defaults where the class's are the release's),
#        the size its makers state in billions of parameters). FLUX.2's from diffusers' scripts/convert_flux2_to_diffusers.py.
_FLUX2 = dict(patch_size=1, in_channels=128, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6)
_SD35 = dict(attention_head_dim=64, joint_attention_dim=4096, pooled_projection_dim=2048, out_channels=16, qk_norm='rms_norm')
RELEASED = {
    'SD 3.5 Medium': ('sd3', 'SD3Transformer2DModel', dict(_SD35, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                                                          dual_attention_layers=tuple(range(13))), 2.5),
    'SD 3.5 Large': ('sd3', 'SD3Transformer2DModel', dict(_SD35, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192), 8.1),
    'Z-Image': ('z-image', 'ZImageTransformer2DModel', {}, 6.0),
    'Qwen-Image': ('qwen-image', 'QwenImageTransformer2DModel', {}, 20.0),
    'FLUX.2 [klein] 4B': ('flux2-klein', 'Flux2Transformer2DModel', dict(_FLUX2, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                                                                          joint_attention_dim=7680, guidance_embeds=False), 4.0),
    'FLUX.2 [klein] 9B': ('flux2-klein', 'Flux2Transformer2DModel', dict(_FLUX2, num_layers=8, num_single_layers=24, attention_head_dim=128, num_attention_heads=32,
                                                                          joint_attention_dim=12288, guidance_embeds=False), 9.0),
    'FLUX.2 [dev]': ('flux2', 'Flux2Transformer2DModel', dict(_FLUX2, num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48,
                                                             joint_attention_dim=15360), 32.0),
}
GB = 1024 ** 3

def weigh(name:str, rank:int=16) -> dict:
    "The released denoiser `name` built on the meta device: its parameters (all, and those in linear layers, which bitsandbytes quantizes), and what its weights and a rank-`rank` LoRA take"
    import diffusers, torch
    from peft import LoraConfig
    from cerebrium_ft.families import FAMILIES, peft_targets
    key, cls, config, stated = RELEASED[name]
    with torch.device('meta'): net = getattr(diffusers, cls)(**config)
    total = sum(p.numel() for p in net.parameters())
    linear = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
    net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=peft_targets(net, FAMILIES[key].lora_targets)))
    lora = sum(p.numel() for n, p in net.named_parameters() if 'lora_' in n)
    rest = total - linear  # norms, embeddings, biases: kept in bf16 when the linear layers are quantized
    return dict(name=name, family=key, params_b=round(total / 1e9, 3), stated_b=stated,
                bf16_gb=round(2 * total / GB, 1), int8_gb=round((linear + 2 * rest) / GB, 1),
                nf4_gb=round((linear * 4.5 / 8 + 2 * rest) / GB, 1),  # 4 bits a weight and a fp32 scale per block of 64 (no double quantization)
                lora_gb=round(lora * (4 + 4 + 8) / GB, 2))  # fp32 LoRA weights, their gradients, AdamW's two moments

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--json', action='store_true', help="one JSON object a line")
    ap.add_argument('--rank', type=int, default=16)
    args = ap.parse_args()
    rows = [weigh(n, args.rank) for n in RELEASED]
    if args.json:
        for r in rows: print(json.dumps(r))
        return
    print(f"{'denoiser':20} {'params B':>9} {'stated':>7} {'bf16 GB':>8} {'8-bit GB':>9} {'nf4 GB':>7} {f'LoRA r{args.rank} GB':>12}   (weights alone, computed on the meta device)")
    for r in rows:
        print(f"{r['name']:20} {r['params_b']:9.2f} {r['stated_b']:7.1f} {r['bf16_gb']:8.1f} {r['int8_gb']:9.1f} {r['nf4_gb']:7.1f} {r['lora_gb']:12.2f}")

if __name__ == '__main__': sys.exit(main())
