/* weightd C ABI: a stable C interface over weightd/client.h, for ctypes, cffi and other FFIs.
 *
 *   wd_client* c = NULL;
 *   if (wd_connect(NULL, &c) != WD_OK) { fprintf(stderr, "%s\n", wd_last_error()); ... }
 *   wd_attachment* a = NULL;
 *   if (wd_attach(c, "llama", 0, &a) == WD_OK) {
 *     for (size_t i = 0; i < wd_attachment_num_tensors(a); ++i) {
 *       wd_tensor_info t;
 *       wd_attachment_tensor(a, i, &t);     // t.name, t.dtype, t.shape[0..t.ndim), t.data, ...
 *     }
 *     wd_attachment_release(a);             // unmaps and releases the lease (last reference)
 *   }
 *   wd_client_free(c);
 *
 * Library: libweightd_client.so exports only the wd_* symbols below (everything else is hidden).
 * Compatibility: functions and enum values are only ever added; wd_tensor_info only grows at
 * its end (wd_abi_version() is bumped when it does).
 *
 * Errors: every function that can fail returns an int status code, WD_OK (0) on success, else
 * one of the WD_* codes (the same numbers as absl::StatusCode / gRPC codes). The message of the
 * last failure on the calling thread -- naming what to fix, as the daemon wrote it -- is
 * wd_last_error(); it stays valid until the next wd_* call on that thread. Out-parameters are
 * left untouched on failure. No function aborts or throws on bad input; NULL handles where a
 * handle is required are WD_INVALID_ARGUMENT.
 *
 * Strings returned through `char**` are allocated by the library and owned by the caller, who
 * frees them with wd_string_free(). Strings inside wd_tensor_info are owned by the attachment.
 *
 * Thread-safety: all functions may be called from any thread. A wd_client and the attachments
 * made from it share one connection; calls on it are serialized by the library (safe, not
 * parallel). wd_attachment reference counting is atomic.
 */
#ifndef WEIGHTD_C_API_H_
#define WEIGHTD_C_API_H_

#include <stddef.h>
#include <stdint.h>

#if defined(WEIGHTD_C_API_BUILD)
#define WD_API __attribute__((visibility("default")))
#else
#define WD_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Increased when a function or a wd_tensor_info field is added.
 * 2: generations (wd_attachment_generation, wd_attachment_refresh, wd_update, wd_update_fd,
 *    wd_wait_generation, wd_rollback). */
#define WD_ABI_VERSION 2

/* Status codes (identical to absl::StatusCode). */
enum {
  WD_OK = 0,
  WD_CANCELLED = 1,
  WD_UNKNOWN = 2,
  WD_INVALID_ARGUMENT = 3,
  WD_DEADLINE_EXCEEDED = 4,
  WD_NOT_FOUND = 5,
  WD_ALREADY_EXISTS = 6,
  WD_PERMISSION_DENIED = 7,
  WD_RESOURCE_EXHAUSTED = 8,
  WD_FAILED_PRECONDITION = 9,
  WD_ABORTED = 10,
  WD_OUT_OF_RANGE = 11,
  WD_UNIMPLEMENTED = 12,
  WD_INTERNAL = 13,
  WD_UNAVAILABLE = 14, /* transport: no daemon, connection lost */
  WD_DATA_LOSS = 15,
  WD_UNAUTHENTICATED = 16,
};

typedef struct wd_client wd_client;
typedef struct wd_attachment wd_attachment;

/* One tensor of an attachment. Every pointer is owned by the attachment and valid while the
 * caller holds a reference to it. */
typedef struct wd_tensor_info {
  const char* name;       /* NUL-terminated */
  const char* dtype;      /* safetensors spelling: "BF16", "F32", "F8_E4M3", ... (static) */
  int32_t itemsize;       /* bytes per element */
  int32_t ndim;           /* number of entries in shape and strides */
  const int64_t* shape;   /* elements */
  const int64_t* strides; /* elements (not bytes) */
  const void* data;       /* read-only: host pointer, or device pointer when device >= 0 */
  int32_t device;         /* this process's CUDA ordinal, -1 for host memory */
  uint32_t crc32c;        /* the daemon's CRC32C of the bytes */
  uint64_t nbytes;
} wd_tensor_info;

/* WD_ABI_VERSION of the loaded library. */
WD_API int wd_abi_version(void);

/* The message of the last failing wd_* call on this thread ("" if none). Valid until the
 * next wd_* call on this thread. Never NULL. */
WD_API const char* wd_last_error(void);

/* Frees a string returned by this library. NULL is ignored. */
WD_API void wd_string_free(char* s);

/* ---- client ------------------------------------------------------------------------------ */

/* Connects and says hello. `socket_path` NULL or "" = the default ($WEIGHTD_SOCKET,
 * $XDG_RUNTIME_DIR/weightd.sock, /run/weightd/weightd.sock). *out is freed with
 * wd_client_free. WD_UNAVAILABLE when no daemon answers. */
WD_API int wd_connect(const char* socket_path, wd_client** out);

/* Frees the handle. Attachments made from it stay valid (they hold the connection). */
WD_API void wd_client_free(wd_client* c);

/* The protocol version agreed in hello, or -1 for a NULL handle. */
WD_API int wd_client_version(const wd_client* c);

/* All visible models as JSON: {"models":[{"name","state","checkpoint","backend","tp",
 * "bytes_total","bytes_done","seconds","generation","previous_generation","error"?,
 * "update"?:{"state","generation","bytes_total","bytes_done","seconds","error"?},
 * "ranks":[{"rank","device","state","arena_bytes","tensors","lease_count",
 * "leases":[{"lease","pid","uid","generation"}]}]}]} (the shape of `weightctl status --json`;
 * "leases" lists at most 64 leases in all, "lease_count" counts the rank's leases; the
 * generations are 0 from a daemon without them; "update" is the running or last update).
 * Free *out_json with wd_string_free. */
WD_API int wd_list_json(wd_client* c, char** out_json);

/* Like wd_list_json; `name` NULL = all models, else that one (WD_NOT_FOUND if absent). */
WD_API int wd_status_json(wd_client* c, const char* name, char** out_json);

/* Starts a load and returns when the daemon accepted it (poll wd_status_json for progress).
 * `options_json` NULL or "" = defaults, else a JSON object with any of: "tp" (int), "ranks"
 * ([int]), "devices" ([int]), "dtype" (string), "skip" ([string]), "recipe" (string),
 * "recipe_file" (string), "expert_parallel" (bool), "allow_uids" ([uint]), "allow_gids"
 * ([uint]). An unknown key or a wrong type is WD_INVALID_ARGUMENT naming the key. */
WD_API int wd_load(wd_client* c, const char* name, const char* checkpoint,
                   const char* options_json);

/* Unloads a model; `force` != 0 unloads even while attached (memory is freed when the last
 * client detaches) or cancels a running load. */
WD_API int wd_unload(wd_client* c, const char* name, int force);

/* The daemon's metrics in Prometheus text format. Free *out_text with wd_string_free. */
WD_API int wd_metrics(wd_client* c, char** out_text);

/* ---- generations (docs/PROTOCOL.md "Generations") ---------------------------------------- */

/* Publishes the tensors of `checkpoint` (a directory or .safetensors file the daemon can read,
 * under its model_roots; any subset of the model's checkpoint tensors, same names, dtypes and
 * shapes) as model `name`'s next generation. `wait` == 0: returns once the daemon accepted the
 * update; != 0: once the new generation is published, or with the update's error. On success
 * *out_json (free with wd_string_free; out_json may be NULL) is {"name","generation","state",
 * "seconds","bytes_read","ranks_rewritten","targets_rewritten","targets_copied",
 * "segments_rewritten","bytes_allocated","bytes_copied"} (client.h UpdateResult): without wait
 * "state" is "updating", "generation" the one the update will publish and the counts 0.
 * WD_INVALID_ARGUMENT naming an unknown tensor (with the nearest names) or one whose dtype or
 * shape differs; WD_FAILED_PRECONDITION naming the model's state (loading, updating, ...). */
WD_API int wd_update(wd_client* c, const char* name, const char* checkpoint, int wait,
                     char** out_json);

/* Like wd_update, the new tensors being the safetensors file in `memfd`: a memfd created with
 * MFD_ALLOW_SEALING and sealed with at least F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW
 * (WD_INVALID_ARGUMENT naming the missing seals otherwise, before anything is sent). The fd is
 * not consumed: the caller closes it whenever it likes after the call. */
WD_API int wd_update_fd(wd_client* c, const char* name, int memfd, int wait, char** out_json);

/* Waits until model `name`'s generation is above `after`, at most `timeout_ms` milliseconds
 * (0 = answer at once; values above 600000, the protocol's limit, are clamped; negative is
 * WD_INVALID_ARGUMENT). *generation gets the generation when the daemon answered and
 * *timed_out (may be NULL) 1 when the timeout passed with it still <= `after`, else 0.
 * WD_NOT_FOUND when the model is unloaded. The client's connection (shared with its
 * attachments) answers nothing else meanwhile: wait on a wd_client of its own. */
WD_API int wd_wait_generation(wd_client* c, const char* name, uint64_t after, int64_t timeout_ms,
                              uint64_t* generation, int* timed_out);

/* Re-publishes the kept previous generation's weights as a new generation, whose number goes to
 * *generation (may be NULL). WD_FAILED_PRECONDITION when the daemon keeps no previous generation
 * (config keep_previous_generation) or an update is running. */
WD_API int wd_rollback(wd_client* c, const char* name, uint64_t* generation);

/* ---- attachments ------------------------------------------------------------------------- */

/* Attaches to one rank: receives the manifest and arena fds and maps them read-only. *out
 * holds one reference; the memory stays mapped and the lease held until the last reference
 * is released. */
WD_API int wd_attach(wd_client* c, const char* name, int rank, wd_attachment** out);

/* Adds a reference. Returns `a`. */
WD_API wd_attachment* wd_attachment_retain(wd_attachment* a);

/* Drops a reference; the last one unmaps the memory and releases the lease. NULL is ignored. */
WD_API void wd_attachment_release(wd_attachment* a);

/* Number of live references (for tests and diagnostics), 0 for NULL. */
WD_API int64_t wd_attachment_refcount(const wd_attachment* a);

/* Model name (owned by the attachment), rank, lease id, sum of the tensors' nbytes. */
WD_API const char* wd_attachment_model(const wd_attachment* a);
WD_API int wd_attachment_rank(const wd_attachment* a);
WD_API uint64_t wd_attachment_lease(const wd_attachment* a);
WD_API uint64_t wd_attachment_total_bytes(const wd_attachment* a);

/* The model generation the attachment maps: 1 from a daemon without generations, 0 for NULL. */
WD_API uint64_t wd_attachment_generation(const wd_attachment* a);

/* Moves the attachment to the model's newest generation. *changed (may be NULL) is 0 when it
 * mapped the newest already (nothing changes), 1 when the new generation's bytes are now mapped
 * AT THE SAME ADDRESSES: every wd_tensor_info pointer, data pointer and exported DLPack tensor
 * stays valid and reads the new bytes (so this is allowed while exports exist); only the
 * tensors' crc32c and wd_attachment_generation change. Host memory is replaced atomically per
 * arena; device memory is unmapped and mapped again, so no kernel or copy may read the weights
 * meanwhile (call it between steps). WD_FAILED_PRECONDITION naming the first difference when
 * the new generation's layout differs, or after wd_attachment_detach; on any error the
 * attachment keeps mapping the generation it had. Not thread-safe with other calls on `a`
 * (wd_attachment_tensor, _verify, _read, _detach, _export_dlpack) or with reading crc32c. */
WD_API int wd_attachment_refresh(wd_attachment* a, int* changed);

/* Number of tensors (0 after wd_attachment_detach). */
WD_API size_t wd_attachment_num_tensors(const wd_attachment* a);

/* Fills *out with tensor `index` (< wd_attachment_num_tensors). WD_OUT_OF_RANGE otherwise. */
WD_API int wd_attachment_tensor(const wd_attachment* a, size_t index, wd_tensor_info* out);

/* Fills out[0..n) with tensors 0..n-1 in one call; n must be <= wd_attachment_num_tensors. */
WD_API int wd_attachment_tensors(const wd_attachment* a, wd_tensor_info* out, size_t n);

/* Index of the tensor called `name`; WD_NOT_FOUND if absent. O(1). */
WD_API int wd_attachment_find(const wd_attachment* a, const char* name, size_t* index);

/* Recomputes every tensor's CRC32C (device tensors are copied to the host first): WD_DATA_LOSS
 * naming the first mismatch. */
WD_API int wd_attachment_verify(const wd_attachment* a);

/* Copies bytes [offset, offset + n) of tensor `index` into host memory `dst` (a memcpy for host
 * memory, cuMemcpyDtoH for device memory): a way to read device weights without CUDA code of
 * one's own. WD_OUT_OF_RANGE when the index or the range is outside the tensor. */
WD_API int wd_attachment_read(const wd_attachment* a, size_t index, uint64_t offset, void* dst,
                              uint64_t n);

/* Unmaps and releases the lease now, returning the daemon's answer. WD_FAILED_PRECONDITION if
 * other references exist (exported tensors would dangle). The handle must still be released. */
WD_API int wd_attachment_detach(wd_attachment* a);

/* Exports tensor `index` as a DLPack DLManagedTensor (the unversioned ABI of DLPack 0.5-0.8,
 * which torch.from_dlpack, numpy and cupy accept in a "dltensor" capsule). *out is a
 * `DLManagedTensor*`; it holds one reference on `a` that its deleter releases (the deleter also
 * frees the struct; it may run on any thread). Device: kDLCPU for host memory, kDLCUDA with
 * the ordinal for device memory. dtype: float/bfloat/int/uint/bool by the tensor's dtype; FP8
 * is exported as uint8 (view it as float8 on the consumer side). The memory is read-only:
 * consumers must not write. WD_UNIMPLEMENTED when the tensor's memory is not mapped. */
WD_API int wd_attachment_export_dlpack(wd_attachment* a, size_t index, void** out);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif /* WEIGHTD_C_API_H_ */
