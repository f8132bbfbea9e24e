// sdcpp-py's native shim, compiled into libstable-diffusion.
//
// Upstream's stable-diffusion.cpp is included here as part of this translation
// unit (CMake marks the original as header-only), so the shim can reach the
// file's static helpers (GenerationRequest, SamplePlan, the latent preparation,
// the VAE axes guard) and repeat generate_image's steps one stage at a time
// without editing upstream. See sdcpp_shim.h for the contract of each entry.
#include "stable-diffusion.cpp"

#include <cstring>
#include <array>
#include <functional>
#include <mutex>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define SHIM_API extern "C" __attribute__((visibility("default")))

#ifndef SDCPP_PY_VERSION
#define SDCPP_PY_VERSION "0+unknown"
#endif

extern "C" {
#include "sdcpp_shim.h"
}

namespace {

thread_local std::string last_error;

int fail(const std::string& message) {
    last_error = message;
    return -1;
}

// A bad argument (shape, count, missing part): the binding raises InvalidArgumentError.
int fail_argument(const std::string& message) {
    last_error = message;
    return -2;
}

// The call was stopped by sdcpp_cancel (the binding raises Cancelled).
int fail_cancelled(const char* what) {
    last_error = std::string(what) + ": cancelled";
    return -3;
}

// Runs f, turning any C++ exception into an error code and message; a call the
// cancel request stopped returns -3 whatever the engine reported.
template <class F>
int guarded(const char* what, F&& f) {
    last_error.clear();
    try {
        int rc = f();
        return rc != 0 && sd_compute_cancelled() ? fail_cancelled(what) : rc;
    } catch (const std::exception& e) {
        return fail(std::string(what) + ": " + e.what());
    } catch (...) {
        return fail(std::string(what) + ": unknown C++ exception");
    }
}

struct Entry {
    int role = 0;
    std::string part;
    int index = 0;
    sd::Tensor<float> f32;
    sd::Tensor<int32_t> i32;
    bool is_int32 = false;
};

std::vector<int64_t> shape_of(const sdcpp_tensor_t& t) {
    if (t.data == nullptr || t.ndim < 1 || t.ndim > 5) {
        throw std::invalid_argument("tensor view without data or with 1..5 dimensions expected");
    }
    std::vector<int64_t> shape(t.ne, t.ne + t.ndim);
    for (int64_t d : shape) {
        if (d <= 0) {
            throw std::invalid_argument("tensor dimensions must be positive");
        }
    }
    return shape;
}

sd::Tensor<float> to_float_tensor(const sdcpp_tensor_t& t) {
    if (t.is_int32) {
        throw std::invalid_argument("expected a float32 tensor");
    }
    sd::Tensor<float> out(shape_of(t));
    std::memcpy(out.data(), t.data, static_cast<size_t>(out.numel()) * sizeof(float));
    return out;
}

sd::Tensor<int32_t> to_int_tensor(const sdcpp_tensor_t& t) {
    if (!t.is_int32) {
        throw std::invalid_argument("expected an int32 tensor");
    }
    sd::Tensor<int32_t> out(shape_of(t));
    std::memcpy(out.data(), t.data, static_cast<size_t>(out.numel()) * sizeof(int32_t));
    return out;
}

// The parts of one role (0 positive, 1 negative) of a conditioning.
SDCondition condition_from(const sdcpp_tensor_t* parts, int n, int role, bool* found) {
    SDCondition c;
    *found = false;
    for (int i = 0; i < n; i++) {
        const sdcpp_tensor_t& p = parts[i];
        if (p.role != role || p.part == nullptr) {
            continue;
        }
        *found        = true;
        std::string k = p.part;
        if (k == "c_crossattn") {
            c.c_crossattn = to_float_tensor(p);
        } else if (k == "c_vector") {
            c.c_vector = to_float_tensor(p);
        } else if (k == "c_concat") {
            c.c_concat = to_float_tensor(p);
        } else if (k == "c_t5_ids") {
            c.c_t5_ids = to_int_tensor(p);
        } else if (k == "c_t5_weights") {
            c.c_t5_weights = to_float_tensor(p);
        } else if (k == "extra_c_crossattn") {
            if (p.index < 0 || p.index > 64) {
                throw std::invalid_argument("extra_c_crossattn index out of range");
            }
            if (c.extra_c_crossattns.size() <= static_cast<size_t>(p.index)) {
                c.extra_c_crossattns.resize(p.index + 1);
            }
            c.extra_c_crossattns[p.index] = to_float_tensor(p);
        } else {
            throw std::invalid_argument("unknown conditioning part '" + k + "'");
        }
    }
    return c;
}

void add_float(std::vector<Entry>& out, int role, const char* part, int index, const sd::Tensor<float>& t) {
    if (t.empty()) {
        return;
    }
    Entry e;
    e.role  = role;
    e.part  = part;
    e.index = index;
    e.f32   = t;
    out.push_back(std::move(e));
}

void add_condition(std::vector<Entry>& out, int role, const SDCondition& c) {
    add_float(out, role, "c_crossattn", 0, c.c_crossattn);
    add_float(out, role, "c_vector", 0, c.c_vector);
    add_float(out, role, "c_concat", 0, c.c_concat);
    add_float(out, role, "c_t5_weights", 0, c.c_t5_weights);
    if (!c.c_t5_ids.empty()) {
        Entry e;
        e.role     = role;
        e.part     = "c_t5_ids";
        e.i32      = c.c_t5_ids;
        e.is_int32 = true;
        out.push_back(std::move(e));
    }
    for (size_t i = 0; i < c.extra_c_crossattns.size(); i++) {
        add_float(out, role, "extra_c_crossattn", static_cast<int>(i), c.extra_c_crossattns[i]);
    }
}

bool ready(sd_ctx_t* ctx, const void* a, const void* b) {
    return ctx != nullptr && ctx->sd != nullptr && a != nullptr && b != nullptr;
}

}  // namespace

struct sdcpp_result {
    std::vector<Entry> entries;
};

namespace {

int deliver(std::unique_ptr<sdcpp_result> result, sdcpp_result_t** out) {
    *out = result.release();
    return 0;
}

bool encoder_is_loaded(sd_ctx_t* ctx) {
    return ctx->sd->cond_stage_model && ctx->sd->cond_stage_model->get_params_buffer_size() > 0;
}

bool diffusion_is_loaded(sd_ctx_t* ctx) {
    return ctx->sd->diffusion_model && ctx->sd->diffusion_model->get_params_buffer_size() > 0;
}

}  // namespace

SHIM_API const char* sdcpp_shim_version(void) {
    return SDCPP_PY_VERSION;
}

SHIM_API const char* sdcpp_last_error(void) {
    return last_error.c_str();
}

SHIM_API int sdcpp_result_count(const sdcpp_result_t* result) {
    return result == nullptr ? 0 : static_cast<int>(result->entries.size());
}

SHIM_API int sdcpp_result_get(const sdcpp_result_t* result, int i, sdcpp_tensor_t* out) {
    if (result == nullptr || out == nullptr || i < 0 || i >= sdcpp_result_count(result)) {
        return fail("result index out of range");
    }
    const Entry& e                    = result->entries[i];
    const std::vector<int64_t>& shape = e.is_int32 ? e.i32.shape() : e.f32.shape();
    if (shape.size() > 5) {
        return fail_argument("tensor has more than 5 dimensions");
    }
    *out          = {};
    out->role     = e.role;
    out->part     = e.part.c_str();
    out->index    = e.index;
    out->is_int32 = e.is_int32;
    out->ndim     = static_cast<int>(shape.size());
    for (size_t d = 0; d < shape.size(); d++) {
        out->ne[d] = shape[d];
    }
    out->data = e.is_int32 ? static_cast<void*>(const_cast<int32_t*>(e.i32.data()))
                           : static_cast<void*>(const_cast<float*>(e.f32.data()));
    return 0;
}

SHIM_API void sdcpp_result_free(sdcpp_result_t* result) {
    delete result;  // destructors of vectors and tensors: noexcept
}

SHIM_API int sdcpp_encode(sd_ctx_t* ctx, const sd_img_gen_params_t* params, bool with_negative,
                          sdcpp_result_t** out) {
    return guarded("encode", [&]() -> int {
        if (!ready(ctx, params, out)) {
            return fail_argument("encode: null argument");
        }
        if (!encoder_is_loaded(ctx)) {
            return fail("encode: the text encoder is released; reload it first");
        }
        StableDiffusionGGML* sd = ctx->sd;
        GenerationRequest request(ctx, params);
        std::vector<sd::Tensor<float>> no_ref_images;
        // The request's LoRAs, as generate_image applies them before conditioning: a text
        // encoder LoRA changes the encoding, and none clears the previous call's adapters.
        sd->apply_loras(params->loras, params->lora_count);

        // As prepare_image_generation_embeds does it.
        ConditionerParams cp;
        cp.text            = request.prompt;
        cp.clip_skip       = request.clip_skip;
        cp.width           = request.width;
        cp.height          = request.height;
        cp.ref_images      = &no_ref_images;
        cp.adm_in_channels = static_cast<int>(sd->diffusion_model->get_adm_in_channels());
        cp.zero_out_masked = false;

        int64_t t0  = ggml_time_ms();
        auto result = std::make_unique<sdcpp_result>();
        SDCondition positive = sd->cond_stage_model->get_learned_condition(sd->n_threads, cp);
        if (sd_compute_cancelled()) {
            return fail_cancelled("encode");
        }
        if (positive.c_crossattn.empty() && positive.c_vector.empty()) {
            return fail("encode: the text encoder failed (see the log)");
        }
        add_condition(result->entries, 0, positive);
        if (with_negative) {
            cp.text            = request.negative_prompt;
            cp.zero_out_masked = sd_version_is_sdxl(sd->version) && request.negative_prompt.empty() &&
                                 !sd->is_using_edm_v_parameterization;
            SDCondition negative = sd->cond_stage_model->get_learned_condition(sd->n_threads, cp);
            if (sd_compute_cancelled()) {
                return fail_cancelled("encode");
            }
            if (negative.c_crossattn.empty() && negative.c_vector.empty()) {
                return fail("encode: the text encoder failed on the negative prompt (see the log)");
            }
            add_condition(result->entries, 1, negative);
        }

        LOG_INFO("get_learned_condition completed, taking %.2fs", (ggml_time_ms() - t0) * 1.0f / 1000);
        return deliver(std::move(result), out);
    });
}

SHIM_API int sdcpp_denoise(sd_ctx_t* ctx, const sd_img_gen_params_t* params,
                           const sdcpp_tensor_t* condition, int n_condition,
                           const sdcpp_tensor_t* init_latent, const sdcpp_tensor_t* noise, int n_noise,
                           const sdcpp_tensor_t* control, sdcpp_result_t** out) {
    return guarded("denoise", [&]() -> int {
        if (!ready(ctx, params, out) || condition == nullptr || n_condition <= 0) {
            return fail_argument("denoise: null argument or empty conditioning");
        }
        if (!diffusion_is_loaded(ctx)) {
            return fail("denoise: the diffusion model is released; reload it first");
        }
        StableDiffusionGGML* sd = ctx->sd;

        // generate_image's steps 1-4, unchanged.
        sd->vae_tiling_params = params->vae_tiling_params;
        GenerationRequest request(ctx, params);
        sd->rng->manual_seed(request.seed);
        sd->sampler_rng->manual_seed(request.seed);
        sd->set_flow_shift(params->sample_params.flow_shift);
        sd->apply_loras(params->loras, params->lora_count);
        ImageVaeAxesGuard axes_guard(ctx, params, request);
        SamplePlan plan(ctx, params, request);
        auto latents_opt = prepare_image_generation_latents(ctx, params, &request, &plan);
        if (!latents_opt.has_value()) {
            return fail("denoise: preparing the latents failed (see the log)");
        }
        ImageGenerationLatents latents = std::move(*latents_opt);

        if (init_latent != nullptr) {
            sd::Tensor<float> given = to_float_tensor(*init_latent);
            if (given.shape() != latents.init_latent.shape()) {
                return fail_argument("denoise: init latent shape " + sd::tensor_shape_to_string(given.shape()) +
                            " does not match " + sd::tensor_shape_to_string(latents.init_latent.shape()) +
                            " for this size");
            }
            if (params->init_image.data == nullptr && request.strength < 1.f) {
                // img2img's schedule trimming (prepare_image_generation_latents).
                size_t t_enc = static_cast<size_t>(plan.sample_steps * request.strength);
                if (t_enc == static_cast<size_t>(plan.sample_steps)) {
                    t_enc--;
                }
                std::vector<float> sigma_sched(plan.sigmas.begin() + plan.sample_steps - t_enc - 1, plan.sigmas.end());
                plan.sigmas       = std::move(sigma_sched);
                plan.sample_steps = static_cast<int>(plan.sigmas.size() - 1);
            }
            latents.init_latent = std::move(given);
        }
        if (noise != nullptr && n_noise != request.batch_count) {
            return fail_argument("denoise: give one noise tensor per image of the batch");
        }
        if (control != nullptr) {
            auto net = sd->z_image_control_net();
            if (net == nullptr) {
                return fail_argument("denoise: a control latent needs a loaded Z-Image ControlNet");
            }
            sd::Tensor<float> given = to_float_tensor(*control);
            const auto& want        = latents.init_latent.shape();
            if (given.dim() < 3 || given.shape()[0] != want[0] || given.shape()[1] != want[1] ||
                given.shape()[2] > net->net.p.control_in_dim || (given.dim() > 3 && given.shape()[3] != 1)) {
                return fail_argument("denoise: control latent shape " + sd::tensor_shape_to_string(given.shape()) +
                                     " does not fit the latent " + sd::tensor_shape_to_string(want) + " and the ControlNet's " +
                                     std::to_string(net->net.p.control_in_dim) + " control channels");
            }
            if (!latents.ref_latents.empty()) {
                return fail_argument("denoise: the Z-Image ControlNet does not run with reference images");
            }
            latents.control_image = std::move(given);
        }

        // Step 5 with the caller's conditioning instead of a new encoding.
        bool has_cond = false, has_uncond = false;
        ImageGenerationEmbeds embeds;
        embeds.cond = condition_from(condition, n_condition, 0, &has_cond);
        if (!has_cond) {
            return fail_argument("denoise: the conditioning has no positive part");
        }
        if (embeds.cond.c_concat.empty()) {
            embeds.cond.c_concat = latents.concat_latent;
        }
        if (request.use_uncond || request.use_high_noise_uncond) {
            embeds.uncond = condition_from(condition, n_condition, 1, &has_uncond);
            if (!has_uncond) {
                return fail_argument("denoise: cfg_scale != 1 needs a negative conditioning (encode with a negative prompt)");
            }
            if (embeds.uncond.c_concat.empty()) {
                embeds.uncond.c_concat = latents.uncond_concat_latent;
            }
        }
        if (request.use_img_cond) {
            embeds.img_cond = SDCondition(embeds.uncond.c_crossattn, embeds.uncond.c_vector, embeds.cond.c_concat);
        }

        // Step 6: per image, reseed both rngs with seed + b, draw noise, sample.
        auto result = std::make_unique<sdcpp_result>();
        for (int b = 0; b < request.batch_count; b++) {
            int64_t start    = ggml_time_ms();
            int64_t cur_seed = request.seed + b;
            LOG_INFO("generating image: %i/%i - seed %" PRId64, b + 1, request.batch_count, cur_seed);
            sd->rng->manual_seed(cur_seed);
            sd->sampler_rng->manual_seed(cur_seed);
            sd::Tensor<float> x_noise;
            if (noise != nullptr) {
                x_noise = to_float_tensor(noise[b]);
                if (x_noise.shape() != latents.init_latent.shape()) {
                    return fail_argument("denoise: noise shape does not match the latent shape");
                }
            } else {
                x_noise = sd::randn_like<float>(latents.init_latent, sd->rng);
            }
            sd::Tensor<float> x_0 = sd->sample(sd->diffusion_model, true, latents.init_latent, std::move(x_noise),
                                               embeds.cond, embeds.uncond, embeds.img_cond, embeds.id_cond,
                                               latents.control_image, request.control_strength, request.guidance,
                                               plan.eta, request.shifted_timestep, plan.sample_method,
                                               sd->is_flow_denoiser(), plan.sigmas, plan.start_merge_step,
                                               latents.ref_latents, request.increase_ref_index,
                                               latents.denoise_mask, sd::Tensor<float>(), 1.f,
                                               request.cache_params);
            if (x_0.empty()) {
                return fail("denoise: sampling failed for image " + std::to_string(b + 1));
            }
            LOG_INFO("sampling completed, taking %.2fs", (ggml_time_ms() - start) * 1.0f / 1000);
            add_float(result->entries, 0, "latent", b, x_0);
        }
        return deliver(std::move(result), out);
    });
}

SHIM_API int sdcpp_decode(sd_ctx_t* ctx, const sd_img_gen_params_t* params, const sdcpp_tensor_t* latent,
                          sd_image_t* out) {
    return guarded("decode", [&]() -> int {
        if (!ready(ctx, params, out) || latent == nullptr) {
            return fail_argument("decode: null argument");
        }
        StableDiffusionGGML* sd = ctx->sd;
        sd::Tensor<float> x     = to_float_tensor(*latent);
        if (x.dim() < 3 || x.shape()[2] != sd->get_latent_channel()) {
            return fail_argument("decode: latent has " + (x.dim() < 3 ? std::string("too few dimensions") : std::to_string(x.shape()[2]) + " channels") +
                        "; this model's latents have " + std::to_string(sd->get_latent_channel()));
        }
        sd->vae_tiling_params = params->vae_tiling_params;
        GenerationRequest request(ctx, params);
        ImageVaeAxesGuard axes_guard(ctx, params, request);
        int64_t t0              = ggml_time_ms();
        sd::Tensor<float> image = sd->decode_first_stage(x);
        if (image.empty()) {
            return fail("decode: the VAE failed (see the log)");
        }
        LOG_INFO("decode_first_stage completed, taking %.2fs", (ggml_time_ms() - t0) * 1.0f / 1000);
        *out = tensor_to_sd_image(image);
        return out->data == nullptr ? fail("decode: out of memory") : 0;
    });
}

SHIM_API int sdcpp_encode_image(sd_ctx_t* ctx, const sd_img_gen_params_t* params, const sd_image_t* image,
                                sdcpp_result_t** out) {
    return guarded("encode_image", [&]() -> int {
        if (!ready(ctx, params, out) || image == nullptr || image->data == nullptr) {
            return fail_argument("encode_image: null argument");
        }
        StableDiffusionGGML* sd = ctx->sd;
        if (sd->vae_decode_only) {
            return fail("encode_image: the context was created without the VAE encoder");
        }
        sd->vae_tiling_params = params->vae_tiling_params;
        GenerationRequest request(ctx, params);
        sd->rng->manual_seed(request.seed);
        sd->sampler_rng->manual_seed(request.seed);
        ImageVaeAxesGuard axes_guard(ctx, params, request);
        sd::Tensor<float> x = sd_image_to_tensor(*image, request.width, request.height);
        sd::Tensor<float> z = sd->encode_first_stage(x);
        if (z.empty()) {
            return fail("encode_image: the VAE encoder failed (see the log)");
        }
        auto result = std::make_unique<sdcpp_result>();
        add_float(result->entries, 0, "latent", 0, z);
        return deliver(std::move(result), out);
    });
}

namespace {

const char* const component_prefix[] = {"text_encoders.", "model.diffusion_model."};

// The operations on a component's runner.
struct Component {
    std::function<void()> release;
    std::function<void()> alloc;
    std::function<size_t()> size;
};

bool component_of(sd_ctx_t* ctx, int which, Component* out) {
    StableDiffusionGGML* sd = ctx->sd;
    if (which == 0 && sd->cond_stage_model) {
        auto m = sd->cond_stage_model;
        *out   = {[m] { m->free_params_buffer(); }, [m] { m->alloc_params_buffer(); },
                  [m] { return m->get_params_buffer_size(); }};
        return true;
    }
    if (which == 1 && sd->diffusion_model) {
        auto m = sd->diffusion_model;
        *out   = {[m] { m->free_params_buffer(); }, [m] { m->alloc_params_buffer(); },
                  [m] { return m->get_params_buffer_size(); }};
        return true;
    }
    return false;
}

// Each context's parameter tensors per component, taken once at creation: upstream's
// get_param_tensors is not safe after a forward pass (blocks[...] lookups of absent
// names insert null blocks), and a reload needs the map again.
using ParamMap = std::map<std::string, ggml_tensor*>;
struct ContextRecord {
    std::array<ParamMap, 2> params;
    std::string weight_buffers;  // extra CPU buffer types its weights may use
};
std::mutex registry_mutex;
std::map<const sd_ctx_t*, ContextRecord> registry;

ParamMap params_of(sd_ctx_t* ctx, int which) {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto it = registry.find(ctx);
    return it == registry.end() ? ParamMap() : it->second.params[which];
}

std::string weight_buffers_of(sd_ctx_t* ctx) {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto it = registry.find(ctx);
    return it == registry.end() ? std::string() : it->second.weight_buffers;
}

// The extra CPU buffer types weights are placed in while it lives (vendor/patches/0006).
struct WeightBuffersScope {
    std::string saved;
    explicit WeightBuffersScope(const std::string& value) : saved(sd_cpu_weight_buffers()) {
        sd_cpu_weight_buffers() = value;
    }
    ~WeightBuffersScope() { sd_cpu_weight_buffers() = saved; }
};


}  // namespace

extern std::string sd_preferred_device;  // util.cpp (vendor/patches/0003)

SHIM_API sd_ctx_t* sdcpp_new_ctx(const sd_ctx_params_t* params, int defer_mask, const char* device,
                                  const char* weight_buffers) {
    last_error.clear();
    struct DeviceScope {  // the preferred device holds for this creation only
        explicit DeviceScope(const char* d) { sd_preferred_device = d == nullptr ? "" : d; }
        ~DeviceScope() { sd_preferred_device.clear(); }
    } device_scope(device);
    const std::string buffers = weight_buffers == nullptr ? "" : weight_buffers;
    WeightBuffersScope buffers_scope(buffers);
    try {
        sd_deferred_load_prefixes.clear();
        for (int i = 0; i < 2; i++) {
            if (defer_mask & (1 << i)) {
                sd_deferred_load_prefixes.push_back(component_prefix[i]);
            }
        }
        sd_ctx_t* ctx = new_sd_ctx(params);
        sd_deferred_load_prefixes.clear();
        if (ctx == nullptr) {
            fail("stable-diffusion.cpp could not create a context (see the log)");
            return nullptr;
        }
        std::array<ParamMap, 2> maps;
        if (ctx->sd->cond_stage_model) {
            ctx->sd->cond_stage_model->get_param_tensors(maps[0]);
        }
        if (ctx->sd->diffusion_model) {
            ctx->sd->diffusion_model->get_param_tensors(maps[1]);
        }
        {
            std::lock_guard<std::mutex> lock(registry_mutex);
            registry[ctx] = ContextRecord{std::move(maps), buffers};
        }
        for (int i = 0; i < 2; i++) {
            Component c;
            if ((defer_mask & (1 << i)) && component_of(ctx, i, &c)) {
                c.release();  // allocated but never filled
            }
        }
        return ctx;
    } catch (const std::exception& e) {
        sd_deferred_load_prefixes.clear();
        fail(std::string("new context: ") + e.what());
        return nullptr;
    } catch (...) {
        sd_deferred_load_prefixes.clear();
        fail("new context: unknown C++ exception");
        return nullptr;
    }
}

SHIM_API const char* sdcpp_cpu_weight_buffer_types(void) {
    static std::string names;
    static std::once_flag once;
    try {
        std::call_once(once, [] {
        ggml_backend_load_all_once();
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        ggml_backend_buffer_type_t* bufts = sd_cpu_extra_bufts(dev);
        for (ggml_backend_buffer_type_t* b = bufts; b != nullptr && *b != nullptr; b++) {
            names += (names.empty() ? "" : ",") + std::string(ggml_backend_buft_name(*b));
        }
        });
    } catch (...) {
        names.clear();
    }
    return names.c_str();
}

SHIM_API int sdcpp_component_buffers(sd_ctx_t* ctx, int which, char* out, size_t size) {
    return guarded("component_buffers", [&]() -> int {
        if (ctx == nullptr || ctx->sd == nullptr || out == nullptr || size == 0) {
            return fail("component_buffers: null argument");
        }
        std::map<std::string, size_t> bytes;
        Component c;
        if (!component_of(ctx, which, &c) || c.size() == 0) {  // released: its buffers are gone
            out[0] = '\0';
            return 0;
        }
        for (const auto& kv : params_of(ctx, which)) {
            ggml_tensor* t = kv.second;
            if (t != nullptr && t->buffer != nullptr) {
                bytes[ggml_backend_buffer_name(t->buffer)] += ggml_backend_buffer_get_alloc_size(t->buffer, t);
            }
        }
        std::string text;
        for (const auto& kv : bytes) {
            text += (text.empty() ? "" : ",") + kv.first + "=" + std::to_string(kv.second);
        }
        snprintf(out, size, "%s", text.c_str());
        return text.size() < size ? 0 : fail("component_buffers: output too small");
    });
}

SHIM_API void sdcpp_free_ctx(sd_ctx_t* ctx) {
    try {
        {
            std::lock_guard<std::mutex> lock(registry_mutex);
            registry.erase(ctx);
        }
        free_sd_ctx(ctx);
    } catch (...) {
        LOG_ERROR("freeing a context failed: unknown C++ exception");
    }
}

SHIM_API bool sdcpp_component_loaded(sd_ctx_t* ctx, int which) {
    try {
        Component c;
        return ctx != nullptr && ctx->sd != nullptr && component_of(ctx, which, &c) && c.size() > 0;
    } catch (...) {
        return false;
    }
}

SHIM_API size_t sdcpp_component_bytes(sd_ctx_t* ctx, int which) {
    try {
        Component c;
        return ctx != nullptr && ctx->sd != nullptr && component_of(ctx, which, &c) ? c.size() : 0;
    } catch (...) {
        return 0;
    }
}

SHIM_API int sdcpp_component_release(sd_ctx_t* ctx, int which) {
    return guarded("component_release", [&]() -> int {
        Component c;
        if (ctx == nullptr || ctx->sd == nullptr || !component_of(ctx, which, &c)) {
            return fail("component_release: no such component");
        }
        c.release();
        LOG_INFO("%s released", which == 0 ? "text encoder" : "diffusion model");
        return 0;
    });
}

SHIM_API int sdcpp_component_reload(sd_ctx_t* ctx, int which, const char* path) {
    return guarded("component_reload", [&]() -> int {
        Component c;
        if (ctx == nullptr || ctx->sd == nullptr || path == nullptr || !component_of(ctx, which, &c)) {
            return fail("component_reload: no such component");
        }
        if (c.size() > 0) {
            return 0;
        }
        StableDiffusionGGML* sd = ctx->sd;
        int64_t t0              = ggml_time_ms();
        ModelLoader loader;
        if (!loader.init_from_file(path, which == 0 ? "text_encoders.llm." : "model.diffusion_model.")) {
            return fail(std::string("component_reload: cannot read ") + path);
        }
        loader.convert_tensors_name();
        ParamMap tensors = params_of(ctx, which);
        if (tensors.empty()) {
            return fail("component_reload: this context was not created by sdcpp_new_ctx");
        }
        // The tensors still point into the freed (or never filled) buffer: detach them so
        // they are allocated anew.
        for (auto& kv : tensors) {
            kv.second->data   = nullptr;
            kv.second->buffer = nullptr;
            kv.second->extra  = nullptr;
        }
        WeightBuffersScope buffers_scope(weight_buffers_of(ctx));
        c.alloc();
        if (c.size() == 0) {
            return fail("component_reload: cannot allocate the weights");
        }
        std::set<std::string> ignore = {"text_encoders.llm.visual.", "text_encoders.llm.vision_model.",
                                        "text_encoders.llm.visual_tokenizer.", "text_encoders.llm.vte.",
                                        "text_encoders.llm.vision_tower.", "text_encoders.llm.multi_modal_projector.",
                                        "model.diffusion_model.__x0__", "model.diffusion_model.__32x32__",
                                        "model.diffusion_model.__index_timestep_zero__"};
        if (!loader.load_tensors(tensors, ignore, sd->n_threads, false)) {
            c.release();
            return fail("component_reload: loading the weights failed (see the log)");
        }
        LOG_INFO("%s reloaded in %.2fs", which == 0 ? "text encoder" : "diffusion model",
                 (ggml_time_ms() - t0) * 1.0f / 1000);
        return 0;
    });
}

struct sdcpp_tokenizer {
    std::shared_ptr<BPETokenizer> tokenizer;
};

SHIM_API sdcpp_tokenizer_t* sdcpp_tokenizer(sd_ctx_t* ctx) {
    sdcpp_tokenizer_t* out = nullptr;
    guarded("tokenizer", [&]() -> int {
        auto llm = ctx == nullptr || ctx->sd == nullptr
                       ? nullptr
                       : std::dynamic_pointer_cast<LLMEmbedder>(ctx->sd->cond_stage_model);
        if (!llm || !llm->tokenizer) {
            return fail_argument("tokenizer: this model's text encoder is not an LLM");
        }
        out = new sdcpp_tokenizer_t{llm->tokenizer};
        return 0;
    });
    return out;
}

SHIM_API int sdcpp_tokenizer_count(sdcpp_tokenizer_t* tokenizer, const char* text, int64_t* count) {
    return guarded("tokenizer_count", [&]() -> int {
        if (tokenizer == nullptr || text == nullptr || count == nullptr) {
            return fail_argument("tokenizer_count: null argument");
        }
        *count = static_cast<int64_t>(tokenizer->tokenizer->encode(text, nullptr).size());
        return 0;
    });
}

SHIM_API void sdcpp_tokenizer_free(sdcpp_tokenizer_t* tokenizer) {
    delete tokenizer;
}

SHIM_API void sdcpp_bf16_convolutions(bool on) {
    sd_bf16_conv_weights = on;
}

SHIM_API void sdcpp_bf16_attention(bool on) {
    sd_attention_bf16_default = on;
}

SHIM_API int sdcpp_forget_loras(sd_ctx_t* ctx) {
    return guarded("forget_loras", [&]() -> int {
        if (ctx == nullptr || ctx->sd == nullptr) {
            return fail("forget_loras: null context");
        }
        ctx->sd->curr_lora_state.clear();
        ctx->sd->cond_stage_lora_models.clear();   // at_runtime LoRAs kept across calls (patches/0013)
        ctx->sd->diffusion_lora_models.clear();
        ctx->sd->first_stage_lora_models.clear();
        return 0;
    });
}

SHIM_API int sdcpp_control_net(sd_ctx_t* ctx, const char* path) {
    return guarded("control_net", [&]() -> int {
        if (ctx == nullptr || ctx->sd == nullptr) {
            return fail("control_net: null context");
        }
        std::string error;
        WeightBuffersScope buffers_scope(weight_buffers_of(ctx));   // repacked like the DiT's weights
        if (!ctx->sd->set_z_image_control_net(path != nullptr ? path : "", &error)) {
            return fail_argument("control_net: " + error);
        }
        return 0;
    });
}

SHIM_API int sdcpp_control_net_info(sd_ctx_t* ctx, char* out, size_t size) {
    return guarded("control_net_info", [&]() -> int {
        if (ctx == nullptr || ctx->sd == nullptr || out == nullptr || size == 0) {
            return fail("control_net_info: null argument");
        }
        auto net     = ctx->sd->z_image_control_net();
        std::string text;
        if (net != nullptr) {
            const auto& p = net->net.p;
            const char* variant = p.layout == ZImage::ControlLayout::V1 ? "1.0" : (p.layout == ZImage::ControlLayout::V2_LAYERS ? "2.0" : "2.1");
            text = std::string("variant=") + variant + ",channels=" + std::to_string(p.control_in_dim) +
                   ",layers=" + std::to_string(p.num_control) + ",refiner=" + std::to_string(p.num_refiner) +
                   ",bytes=" + std::to_string(net->get_params_buffer_size()) + ",buffers=" + net->buffers;
        }
        snprintf(out, size, "%s", text.c_str());
        return 0;
    });
}

SHIM_API int sdcpp_share_encoder(sd_ctx_t* owner, sd_ctx_t* borrower) {
    return guarded("share_encoder", [&]() -> int {
        if (owner == nullptr || borrower == nullptr || owner->sd == nullptr || borrower->sd == nullptr) {
            return fail("share_encoder: null context");
        }
        auto from = std::dynamic_pointer_cast<LLMEmbedder>(owner->sd->cond_stage_model);
        auto to   = std::dynamic_pointer_cast<LLMEmbedder>(borrower->sd->cond_stage_model);
        if (!from || !to || !from->llm || !to->llm) {
            return fail("share_encoder: both models must use an LLM text encoder");
        }
        if (from->llm == to->llm) {
            return 0;
        }
        to->llm = from->llm;  // the borrower's own runner (and its weights) is released here
        std::lock_guard<std::mutex> lock(registry_mutex);
        if (registry.count(owner) && registry.count(borrower)) {
            registry[borrower].params[0] = registry[owner].params[0];
        }
        LOG_INFO("text encoder shared between two contexts");
        return 0;
    });
}

namespace {

// GGMLRunner keeps its backends protected; pointers to members taken through a
// derived class reach them without changing upstream.
struct RunnerBackends : GGMLRunner {
    static ggml_backend_t GGMLRunner::*runtime() { return &RunnerBackends::runtime_backend; }
    static ggml_backend_t GGMLRunner::*params() { return &RunnerBackends::params_backend; }
};

}  // namespace

SHIM_API int sdcpp_rebind_encoder(sd_ctx_t* ctx) {
    return guarded("rebind_encoder", [&]() -> int {
        if (ctx == nullptr || ctx->sd == nullptr) {
            return fail("rebind_encoder: null context");
        }
        auto embedder = std::dynamic_pointer_cast<LLMEmbedder>(ctx->sd->cond_stage_model);
        if (!embedder || !embedder->llm) {
            return fail("rebind_encoder: no LLM text encoder");
        }
        ggml_backend_t backend = ctx->sd->clip_backend != nullptr ? ctx->sd->clip_backend : ctx->sd->backend;
        GGMLRunner* runner     = embedder->llm.get();
        if (runner->*RunnerBackends::params() == runner->*RunnerBackends::runtime()) {
            runner->*RunnerBackends::params() = backend;
        }
        runner->*RunnerBackends::runtime() = backend;
        return 0;
    });
}

// -- cancellation (vendor/patches/0007) ------------------------------------------------

SHIM_API void sdcpp_cancel(void) {
    sd_cancel_flag().store(1);
}

SHIM_API void sdcpp_cancel_clear(void) {
    sd_cancel_flag().store(0);
}

SHIM_API bool sdcpp_cancel_requested(void) {
    return sd_compute_cancelled();
}

SHIM_API int64_t sdcpp_aborted_computes(void) {
    return sd_aborted_computes().load();
}

SHIM_API int sdcpp_generate(sd_ctx_t* ctx, const sd_img_gen_params_t* params, sd_image_t** out) {
    return guarded("generate", [&]() -> int {
        if (!ready(ctx, params, out)) {
            return fail_argument("generate: null argument");
        }
        *out = generate_image(ctx, params);
        if (*out != nullptr && sd_compute_cancelled()) {  // stopped after its last compute
            for (int i = 0; i < params->batch_count; i++) {
                free((*out)[i].data);
            }
            free(*out);
            *out = nullptr;
        }
        return *out == nullptr ? fail("generate: generation failed (see the log)") : 0;
    });
}

SHIM_API void sdcpp_test_abort(void) {
    fprintf(stderr, "sdcpp_test_abort: aborting on request (a test of crash isolation)\n");
    fflush(stderr);
    abort();
}
