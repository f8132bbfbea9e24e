/* sdcpp-py native shim: plain C declarations, parsed as they are by cffi
 * (no preprocessor lines; the types of stable-diffusion.h come first) and
 * included by sdcpp_shim.cpp.
 *
 * Staged generation: encode (text -> conditioning), denoise (conditioning ->
 * latents), decode (latent -> image) and encode_image (image -> latent), each a
 * call of its own, so one encoding serves many seeds, sizes and step counts.
 * Every entry returns 0 on success, -2 for a bad argument (shape, count, missing
 * part), -3 when sdcpp_cancel stopped it, or -1 for any other failure, with a message for sdcpp_last_error()
 * (kept per thread); C++ exceptions never cross this boundary. */

/* The sdcpp_py version this library was built for (the Python package checks it). */
const char* sdcpp_shim_version(void);

/* The message of the last failed call on this thread ("" if none). */
const char* sdcpp_last_error(void);

/* A tensor view: shape in ggml order (ne[0] innermost), float32 or int32 data.
 * Conditioning parts carry role (0 positive, 1 negative), the part name
 * ("c_crossattn", "c_vector", "c_concat", "c_t5_ids", "c_t5_weights",
 * "extra_c_crossattn") and an index (within extra_c_crossattn, else 0). */
typedef struct {
    int role;
    const char* part;
    int index;
    int is_int32;
    int ndim;
    int64_t ne[5];
    void* data;
} sdcpp_tensor_t;

/* Tensors owned by the library, read through sdcpp_result_get, freed by sdcpp_result_free. */
typedef struct sdcpp_result sdcpp_result_t;
int sdcpp_result_count(const sdcpp_result_t* result);
int sdcpp_result_get(const sdcpp_result_t* result, int i, sdcpp_tensor_t* out);
void sdcpp_result_free(sdcpp_result_t* result);

/* Text -> conditioning. Uses params->prompt, negative_prompt, clip_skip, width
 * and height as generate_image does; the negative prompt is encoded only when
 * with_negative is true. */
int sdcpp_encode(sd_ctx_t* ctx, const sd_img_gen_params_t* params, bool with_negative,
                 sdcpp_result_t** out);

/* Conditioning (+ optional init latent, optional noise) -> params->batch_count
 * latents, exactly as generate_image samples them: same seeds (seed + i), rng
 * reseeding, flow shift, sigmas, guidance. init_latent (one latent) replaces
 * txt2img's empty latent and params->strength trims the schedule as img2img
 * does; noise (batch_count latents, or NULL) replaces the seeded noise.
 * params->ref_images are encoded as reference latents (FLUX.2 editing). control (or
 * NULL): the control latent of a loaded Z-Image ControlNet ([W, H, C] at the latent's size,
 * C up to the ControlNet's control channels, the rest zero), weighted by
 * params->control_strength. */
int sdcpp_denoise(sd_ctx_t* ctx, const sd_img_gen_params_t* params,
                  const sdcpp_tensor_t* condition, int n_condition,
                  const sdcpp_tensor_t* init_latent, const sdcpp_tensor_t* noise, int n_noise,
                  const sdcpp_tensor_t* control, sdcpp_result_t** out);

/* Latent -> image (data allocated with malloc: free it with free()). Uses
 * params->vae_tiling_params, width and height. */
int sdcpp_decode(sd_ctx_t* ctx, const sd_img_gen_params_t* params, const sdcpp_tensor_t* latent,
                 sd_image_t* out);

/* Image -> latent, with the rngs seeded from params->seed as generate_image seeds
 * them before it encodes an init image. */
int sdcpp_encode_image(sd_ctx_t* ctx, const sd_img_gen_params_t* params, const sd_image_t* image,
                       sdcpp_result_t** out);

/* Contexts. sdcpp_new_ctx is new_sd_ctx that can leave components unloaded
 * (defer_mask: bit 0 the text encoder, bit 1 the diffusion model), to be loaded
 * on demand, and run on a named ggml device ("CPU", "Vulkan0", ...; NULL or ""
 * for the engine's choice); contexts it creates must be freed with sdcpp_free_ctx.
 * weight_buffers names the CPU backend's extra buffer types matmul weights may
 * be placed in (repacked kernels): "" or NULL none, "*" any, or a comma-separated
 * list of names from sdcpp_cpu_weight_buffer_types(); it holds for reloads too. */
sd_ctx_t* sdcpp_new_ctx(const sd_ctx_params_t* params, int defer_mask, const char* device,
                        const char* weight_buffers);

/* The CPU backend's extra buffer types, in the order weights are offered to
 * them, comma-separated ("AMX,CPU_REPACK"; "" when there are none). */
const char* sdcpp_cpu_weight_buffer_types(void);

/* A component's resident weight bytes per buffer name, as "CPU=123,CPU_REPACK=456"
 * written into out (size bytes). */
int sdcpp_component_buffers(sd_ctx_t* ctx, int component, char* out, size_t size);
void sdcpp_free_ctx(sd_ctx_t* ctx);

/* Component residency: 0 = text encoder, 1 = diffusion model. A released
 * component's weights are freed; reload reads them again from path (the file
 * the context was created from). */
bool sdcpp_component_loaded(sd_ctx_t* ctx, int component);
size_t sdcpp_component_bytes(sd_ctx_t* ctx, int component);  /* resident weight bytes */
int sdcpp_component_release(sd_ctx_t* ctx, int component);
int sdcpp_component_reload(sd_ctx_t* ctx, int component, const char* path);

/* Convolution weights in BF16 where tensor_type_rules ask for it, for the contexts created
 * while this is on (vendor/patches/0014; CPU contexts only). */
void sdcpp_bf16_convolutions(bool on);

/* Attention on the CPU's BF16 flash tiles where the module has AVX512_BF16 (vendor/patches/0020),
 * for the contexts created while this is on (the default); off: the engine's F32 and F16 paths. */
void sdcpp_bf16_attention(bool on);

/* Forget the LoRAs of earlier calls. Merged into the weights (lora_apply_mode immediately):
 * the engine undoes a merged LoRA by subtracting it again, which leaves the rounding of
 * quantized and 16-bit weights behind; the binding reloads the weights from their files
 * instead and then calls this, so the next request's LoRAs are merged into the fresh
 * weights. Applied at run time: the loaded LoRAs kept for the next call with the same
 * files are dropped (the binding calls this when a file changed under the same path). */
int sdcpp_forget_loras(sd_ctx_t* ctx);

/* Load a Z-Image ControlNet Union file (1.0, 2.0 or 2.1 layout; safetensors or GGUF) beside
 * the context's DiT, replacing one loaded before; NULL or "" drops it. -2 with a message for a
 * file that is not one, or does not fit the DiT. */
int sdcpp_control_net(sd_ctx_t* ctx, const char* path);

/* The loaded ControlNet as "variant=2.1,channels=33,layers=15,refiner=2,bytes=N,buffers=CPU:N/
 * CPU_REPACK:N" (its weights' bytes per buffer; "" when none) written into out (size bytes). The
 * ControlNet's weights go to the extra CPU buffer types the context's weights may use. */
int sdcpp_control_net_info(sd_ctx_t* ctx, char* out, size_t size);

/* Make borrower's text encoder the owner's (one set of weights in memory for two
 * contexts of LLM-conditioned models built from the same encoder file). The
 * borrower's own encoder is freed. Both conditioners keep their own prompt
 * templates and output layers. */
int sdcpp_share_encoder(sd_ctx_t* owner, sd_ctx_t* borrower);

/* The context's LLM tokenizer as a handle of its own (NULL, with a message, when the text
   encoder is not an LLM): it lives until sdcpp_tokenizer_free, whatever happens to the
   context, and sdcpp_tokenizer_count may run on any thread, beside engine calls (the
   tokenizer only reads its tables). count: the tokens of `text` (no chat template, no
   padding). */
typedef struct sdcpp_tokenizer sdcpp_tokenizer_t;
sdcpp_tokenizer_t* sdcpp_tokenizer(sd_ctx_t* ctx);
int sdcpp_tokenizer_count(sdcpp_tokenizer_t* tokenizer, const char* text, int64_t* count);
void sdcpp_tokenizer_free(sdcpp_tokenizer_t* tokenizer);

/* Point the (shared) text encoder of ctx at ctx's own backend. Call it on a
 * context that stays open before freeing another member of a sharing group:
 * the encoder must not run on a freed context's backend. */
int sdcpp_rebind_encoder(sd_ctx_t* ctx);

/* Cancellation, process-wide: sdcpp_cancel (any thread, any time) stops the
 * running call within the graph computation it is in (CPU: after the current
 * graph node; backends without an abort callback: before the next graph) and
 * makes it return -3; calls refuse to compute until sdcpp_cancel_clear. */
void sdcpp_cancel(void);
void sdcpp_cancel_clear(void);
bool sdcpp_cancel_requested(void);
/* Graph computations stopped midway since the library was loaded. */
int64_t sdcpp_aborted_computes(void);

/* generate_image with the shim's error contract; *out holds params->batch_count
 * images (free each data, then the array, with free()). */
int sdcpp_generate(sd_ctx_t* ctx, const sd_img_gen_params_t* params, sd_image_t** out);

/* For tests of crash isolation only: abort() the process, as a failed engine assert does. */
void sdcpp_test_abort(void);
