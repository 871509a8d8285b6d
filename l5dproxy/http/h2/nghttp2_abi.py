"""libnghttp2's ABI as the ``nghttp2`` codec engine uses it, loaded through cffi.

Only the declarations ``nghttp2.py`` calls (nghttp2.h of 1.52, Debian 12's
``libnghttp2-14``; the structs are public ABI, stable since 1.0). ABI mode:
no compiler and no headers at install, the library is found with
``ctypes.util.find_library``. ``uint8_t *`` pointers to octets are declared
``char *`` (the same ABI) so cffi reads and writes them as ``bytes``.
"""

from __future__ import annotations

import ctypes.util
from typing import Any

CDEF = """
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct nghttp2_option nghttp2_option;

typedef struct {
  size_t length; int32_t stream_id; uint8_t type; uint8_t flags; uint8_t reserved;
} nghttp2_frame_hd;
typedef struct { int32_t stream_id; int32_t weight; uint8_t exclusive; } nghttp2_priority_spec;
typedef struct {
  char *name; char *value; size_t namelen; size_t valuelen; uint8_t flags;
} nghttp2_nv;
typedef struct {
  nghttp2_frame_hd hd; size_t padlen; nghttp2_priority_spec pri_spec;
  nghttp2_nv *nva; size_t nvlen; int cat;
} nghttp2_headers;
typedef struct { nghttp2_frame_hd hd; uint32_t error_code; } nghttp2_rst_stream;
typedef struct { int32_t settings_id; uint32_t value; } nghttp2_settings_entry;
typedef struct {
  nghttp2_frame_hd hd; size_t niv; nghttp2_settings_entry *iv;
} nghttp2_settings;
typedef struct {
  nghttp2_frame_hd hd; int32_t last_stream_id; uint32_t error_code;
  char *opaque_data; size_t opaque_data_len; uint8_t reserved;
} nghttp2_goaway;
typedef struct {
  nghttp2_frame_hd hd; int32_t window_size_increment; uint8_t reserved;
} nghttp2_window_update;
typedef union {
  nghttp2_frame_hd hd;
  nghttp2_headers headers;
  nghttp2_rst_stream rst_stream;
  nghttp2_settings settings;
  nghttp2_goaway goaway;
  nghttp2_window_update window_update;
} nghttp2_frame;

typedef union { int fd; void *ptr; } nghttp2_data_source;
typedef ssize_t (*nghttp2_data_source_read_callback)(
    nghttp2_session *session, int32_t stream_id, char *buf, size_t length,
    uint32_t *data_flags, nghttp2_data_source *source, void *user_data);
typedef struct {
  nghttp2_data_source source; nghttp2_data_source_read_callback read_callback;
} nghttp2_data_provider;

typedef struct {
  int age; int version_num; const char *version_str; const char *proto_str;
} nghttp2_info;

typedef int (*nghttp2_on_begin_headers_callback)(
    nghttp2_session *session, const nghttp2_frame *frame, void *user_data);
typedef int (*nghttp2_on_header_callback)(
    nghttp2_session *session, const nghttp2_frame *frame, const char *name,
    size_t namelen, const char *value, size_t valuelen, uint8_t flags, void *user_data);
typedef int (*nghttp2_on_frame_recv_callback)(
    nghttp2_session *session, const nghttp2_frame *frame, void *user_data);
typedef int (*nghttp2_on_invalid_frame_recv_callback)(
    nghttp2_session *session, const nghttp2_frame *frame, int lib_error_code, void *user_data);
typedef int (*nghttp2_on_data_chunk_recv_callback)(
    nghttp2_session *session, uint8_t flags, int32_t stream_id,
    const char *data, size_t len, void *user_data);
typedef int (*nghttp2_on_stream_close_callback)(
    nghttp2_session *session, int32_t stream_id, uint32_t error_code, void *user_data);

nghttp2_info *nghttp2_version(int least_version);
const char *nghttp2_strerror(int lib_error_code);

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr);
void nghttp2_session_callbacks_del(nghttp2_session_callbacks *callbacks);
void nghttp2_session_callbacks_set_on_begin_headers_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_begin_headers_callback cb);
void nghttp2_session_callbacks_set_on_header_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_header_callback cb);
void nghttp2_session_callbacks_set_on_frame_recv_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_frame_recv_callback cb);
void nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_invalid_frame_recv_callback cb);
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_data_chunk_recv_callback cb);
void nghttp2_session_callbacks_set_on_stream_close_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_stream_close_callback cb);

int nghttp2_option_new(nghttp2_option **option_ptr);
void nghttp2_option_del(nghttp2_option *option);
void nghttp2_option_set_no_auto_window_update(nghttp2_option *option, int val);
void nghttp2_option_set_no_http_messaging(nghttp2_option *option, int val);
void nghttp2_option_set_no_closed_streams(nghttp2_option *option, int val);
void nghttp2_option_set_max_deflate_dynamic_table_size(nghttp2_option *option, size_t val);
void nghttp2_option_set_max_outbound_ack(nghttp2_option *option, size_t val);
void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *option, uint64_t burst,
    uint64_t rate);

int nghttp2_session_server_new2(nghttp2_session **session_ptr,
    const nghttp2_session_callbacks *callbacks, void *user_data, const nghttp2_option *option);
int nghttp2_session_client_new2(nghttp2_session **session_ptr,
    const nghttp2_session_callbacks *callbacks, void *user_data, const nghttp2_option *option);
void nghttp2_session_del(nghttp2_session *session);

int nghttp2_submit_settings(nghttp2_session *session, uint8_t flags,
    const nghttp2_settings_entry *iv, size_t niv);
int32_t nghttp2_submit_request(nghttp2_session *session, const nghttp2_priority_spec *pri_spec,
    const nghttp2_nv *nva, size_t nvlen, const nghttp2_data_provider *data_prd,
    void *stream_user_data);
int nghttp2_submit_response(nghttp2_session *session, int32_t stream_id,
    const nghttp2_nv *nva, size_t nvlen, const nghttp2_data_provider *data_prd);
int nghttp2_submit_trailer(nghttp2_session *session, int32_t stream_id,
    const nghttp2_nv *nva, size_t nvlen);
int nghttp2_submit_rst_stream(nghttp2_session *session, uint8_t flags, int32_t stream_id,
    uint32_t error_code);
int nghttp2_session_resume_data(nghttp2_session *session, int32_t stream_id);
int nghttp2_session_set_local_window_size(nghttp2_session *session, uint8_t flags,
    int32_t stream_id, int32_t window_size);
int nghttp2_session_terminate_session2(nghttp2_session *session, int32_t last_stream_id,
    uint32_t error_code);

ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const char *in, size_t inlen);
ssize_t nghttp2_session_mem_send(nghttp2_session *session, const char **data_ptr);
int nghttp2_session_consume(nghttp2_session *session, int32_t stream_id, size_t size);
int nghttp2_session_consume_connection(nghttp2_session *session, size_t size);
int nghttp2_session_consume_stream(nghttp2_session *session, int32_t stream_id, size_t size);
int nghttp2_session_want_read(nghttp2_session *session);
int nghttp2_session_want_write(nghttp2_session *session);
int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *session,
    int32_t stream_id);
int32_t nghttp2_session_get_remote_window_size(nghttp2_session *session);
uint32_t nghttp2_session_get_remote_settings(nghttp2_session *session, int id);
uint32_t nghttp2_session_get_next_stream_id(nghttp2_session *session);
int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session);
size_t nghttp2_session_get_hd_deflate_dynamic_table_size(nghttp2_session *session);
"""

#: Declared above but not in every 1.52 build (1.57 upstream, backported by
#: Debian 12's security updates): called only where the library has it.
OPTIONAL = ("nghttp2_option_set_stream_reset_rate_limit",)

#: The oldest libnghttp2 whose ABI the declarations were checked against
#: (1.52.0, Debian 12; every call above exists since 1.31).
MIN_VERSION = 0x013400


class Nghttp2UnavailableError(RuntimeError):
    """cffi or libnghttp2 (at least 1.52.0) cannot be loaded here."""


_loaded: tuple[Any, Any] | None = None


def load() -> tuple[Any, Any]:
    """``(ffi, lib)``: cffi's FFI with the declarations above and the opened
    libnghttp2, loaded once. Raises ``Nghttp2UnavailableError`` saying what
    is missing."""
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        import cffi  # type: ignore[import-untyped]
    except ImportError as e:
        raise Nghttp2UnavailableError(f"cffi is not installed ({e})") from e
    path = ctypes.util.find_library("nghttp2")
    if path is None:
        raise Nghttp2UnavailableError(
            "libnghttp2 not found (Debian: apt-get install libnghttp2-14)")
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    try:
        lib = ffi.dlopen(path)
    except OSError as e:
        raise Nghttp2UnavailableError(f"cannot open {path}: {e}") from e
    if lib.nghttp2_version(MIN_VERSION) == ffi.NULL:
        found = ffi.string(lib.nghttp2_version(0).version_str).decode()
        raise Nghttp2UnavailableError(f"libnghttp2 {found} is older than 1.52.0")
    _loaded = ffi, lib
    return _loaded


def version() -> str:
    """The loaded libnghttp2's version, e.g. ``"1.52.0"``."""
    ffi, lib = load()
    return ffi.string(lib.nghttp2_version(0).version_str).decode()
