"""The shapes of Stable Diffusion 1.5, 2.1 and SDXL base 1.0: UNet2DConditionModel, CLIPTextConfig
and (SDXL) AutoencoderKL keyword arguments (the benchmarks build them on the meta device or with
random weights). SDXL's are those of its unet/, text_encoder/, text_encoder_2/ and vae/ config.json."""

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8)
SD21 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)

# SDXL: three levels (no attention at 320), 1/2/10 transformer blocks (the mid block has 10 too),
# conditioned on both encoders' penultimate states (768 + 1280 = 2048) and, through "text_time",
# on bigG's pooled embedding (1280) plus six size/crop numbers (6 x 256): 2816.
SDXL = dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, sample_size=128)
CLIP_L_SDXL = dict(CLIP_L, projection_dim=768)  # text_encoder: a CLIPTextModel, so the projection is not built
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)  # text_encoder_2: a CLIPTextModelWithProjection
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=1024)
