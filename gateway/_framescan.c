/* The relay's frame scan in C (issue 16): the common frames of both directions at C speed.
 *
 * Two functions, each a pure accelerator for gateway/relay.py: they handle a run of the
 * frames that need no decision — final (unfragmented) text and binary data frames with a
 * valid header, complete in the buffer, under the size cap — and stop, returning where they
 * stopped, at the first frame that needs one (a control frame, a fragment, a header that
 * breaks RFC 6455, an incomplete frame, a message over the cap, a client text that is not
 * UTF-8 or that the guard must see, an upstream text that may carry usage).  The Python code
 * handles that frame exactly as it does without this module, then calls the scan again: the
 * pure-Python relay (gateway.relay.FRAMESCAN = None) is the reference, and behaves the same.
 *
 * scan_client(data, pos, room, pool, pool_pos, guarded_a, guarded_b)
 *     -> (pos, out, messages, payload_bytes, pool_pos)
 *   data[pos:] holds client frames (masked, RFC 6455 §5.3).  Each frame handled is unmasked,
 *   checked (UTF-8 for text, RFC 3629: no overlongs, surrogates or code points over
 *   U+10FFFF; neither ``guarded_a`` nor ``guarded_b`` in the payload unless both are None)
 *   and written to ``out`` with its header unchanged and its payload masked again with the
 *   next 4 bytes of ``pool`` (a CSPRNG pool, from ``pool_pos``).  ``out`` is None when no
 *   frame was handled.  ``room``: bytes a payload may have (1009 above it: Python decides).
 *
 * scan_upstream(data, pos, room, marker_a, marker_b) -> (pos, messages, payload_bytes)
 *   data[pos:] holds upstream frames (unmasked, §5.1); each frame handled is counted and
 *   left in place (the caller writes the run as it is).  A text frame whose payload holds
 *   ``marker_a`` or ``marker_b`` (a usage event) stops the scan.
 *
 * Both read only data[pos:len(data)]: every length is checked against the buffer before a
 * byte is read, and a 64-bit length over PY_SSIZE_T_MAX is "over the cap" (stop).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define OP_TEXT 0x1
#define OP_BINARY 0x2

/* The header of the frame at buf[0:avail]: its size (masking key included) and payload
 * length, or 0 when the frame is not one this module handles or is incomplete. */
static Py_ssize_t
data_frame_header(const unsigned char *buf, Py_ssize_t avail, int masked, Py_ssize_t room,
                  Py_ssize_t *length, int *opcode)
{
    if (avail < 2)
        return 0;
    unsigned char b0 = buf[0], b1 = buf[1];
    if ((b1 & 0x80) != (masked ? 0x80 : 0))
        return 0;  /* wrong mask bit: Python fails the connection */
    if ((b0 & 0xF0) != 0x80)
        return 0;  /* not final, or RSV bits: Python decides */
    int op = b0 & 0x0F;
    if (op != OP_TEXT && op != OP_BINARY)
        return 0;
    uint64_t len = b1 & 0x7F;
    Py_ssize_t size = masked ? 6 : 2;
    if (len == 126) {
        if (avail < 4)
            return 0;
        len = ((uint64_t)buf[2] << 8) | buf[3];
        size += 2;
    } else if (len == 127) {
        if (avail < 10)
            return 0;
        len = 0;
        for (int i = 2; i < 10; i++)
            len = (len << 8) | buf[i];
        size += 8;
    }
    if (avail < size)
        return 0;  /* the header (or the masking key) is incomplete */
    if (len > (uint64_t)room || len > (uint64_t)(avail - size))
        return 0;  /* over the cap (Python: 1009) or incomplete */
    *length = (Py_ssize_t)len;
    *opcode = op;
    return size;
}

/* dst[0:n] = src[0:n] XOR key (RFC 6455 §5.3), eight bytes at a time. */
static void
xor_mask(unsigned char *dst, const unsigned char *src, Py_ssize_t n, const unsigned char *key)
{
    uint32_t k32;
    memcpy(&k32, key, 4);
    uint64_t k64 = ((uint64_t)k32 << 32) | k32;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v;
        memcpy(&v, src + i, 8);
        v ^= k64;
        memcpy(dst + i, &v, 8);
    }
    for (; i < n; i++)
        dst[i] = src[i] ^ key[i & 3];
}

/* Whether s[0:n] is UTF-8 (RFC 3629), as Python's strict decoder decides. */
static int
valid_utf8(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t v;
            memcpy(&v, s + i, 8);
            if (!(v & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
        } else if (c >= 0xC2 && c <= 0xDF) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (i + 2 >= n)
                return 0;
            unsigned char c1 = s[i + 1];
            if ((c1 & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80)
                return 0;
            if (c == 0xE0 && c1 < 0xA0)
                return 0;  /* overlong */
            if (c == 0xED && c1 > 0x9F)
                return 0;  /* surrogate */
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (i + 3 >= n)
                return 0;
            unsigned char c1 = s[i + 1];
            if ((c1 & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 || (s[i + 3] & 0xC0) != 0x80)
                return 0;
            if (c == 0xF0 && c1 < 0x90)
                return 0;  /* overlong */
            if (c == 0xF4 && c1 > 0x8F)
                return 0;  /* over U+10FFFF */
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* Whether needle[0:m] occurs in hay[0:n].  The search runs memchr (vectorised in libc) for
 * one pivot byte of the needle — its first backslash, else its first dot, else its first
 * byte — and compares the needle around each hit: the gateway's needles ("session.update",
 * "\\u", "\"response.done\"", "transcription.completed") all hold a byte that base64 audio,
 * the bulk of Realtime traffic, never contains, so the scan rarely stops.  A general
 * substring search (glibc memmem) costs several times more on such payloads. */
static int
contains(const unsigned char *hay, Py_ssize_t n, const char *needle, Py_ssize_t m)
{
    if (m <= 0 || n < m)
        return 0;
    const char *pivot = memchr(needle, '\\', (size_t)m);
    if (pivot == NULL)
        pivot = memchr(needle, '.', (size_t)m);
    Py_ssize_t at = pivot == NULL ? 0 : pivot - needle;
    unsigned char c = (unsigned char)needle[at];
    const unsigned char *p = hay + at;
    const unsigned char *last = hay + n - m + at;  /* the last place the pivot can match */
    while (p <= last) {
        p = memchr(p, c, (size_t)(last - p + 1));
        if (p == NULL)
            return 0;
        if (memcmp(p - at, needle, (size_t)m) == 0)
            return 1;
        p++;
    }
    return 0;
}

/* A bytes argument or None: its buffer and length (NULL, 0 for None). */
static int
optional_bytes(PyObject *obj, const char **buf, Py_ssize_t *len)
{
    if (obj == Py_None) {
        *buf = NULL;
        *len = 0;
        return 1;
    }
    if (!PyBytes_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "expected bytes or None");
        return 0;
    }
    *buf = PyBytes_AS_STRING(obj);
    *len = PyBytes_GET_SIZE(obj);
    return 1;
}

/* The client scan over data[pos:n] (see scan_client): writes the handled frames, re-masked,
 * to *out (allocated here, NULL when none) and returns the position it stopped at. */
static Py_ssize_t
client_run(const unsigned char *data, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t room,
           const unsigned char *pool, Py_ssize_t pool_len, Py_ssize_t *pool_pos,
           const char *guard_a, Py_ssize_t guard_a_len, const char *guard_b,
           Py_ssize_t guard_b_len, PyObject **out, Py_ssize_t *messages,
           Py_ssize_t *payload_bytes)
{
    unsigned char *dst = NULL;
    Py_ssize_t written = 0;
    *out = NULL;
    *messages = *payload_bytes = 0;
    while (pos < n && *pool_pos + 4 <= pool_len) {
        Py_ssize_t length;
        int opcode;
        Py_ssize_t size = data_frame_header(data + pos, n - pos, 1, room, &length, &opcode);
        if (size == 0)
            break;
        if (*out == NULL) {
            *out = PyBytes_FromStringAndSize(NULL, n - pos);  /* what is left: an upper bound */
            if (*out == NULL)
                return -1;
            dst = (unsigned char *)PyBytes_AS_STRING(*out);
        }
        unsigned char *frame = dst + written;
        unsigned char *payload = frame + size;
        xor_mask(payload, data + pos + size, length, data + pos + size - 4);
        if (opcode == OP_TEXT && !valid_utf8(payload, length))
            break;
        if (guard_a != NULL && (contains(payload, length, guard_a, guard_a_len)
                                || contains(payload, length, guard_b, guard_b_len)))
            break;
        memcpy(frame, data + pos, (size_t)(size - 4));
        memcpy(frame + size - 4, pool + *pool_pos, 4);
        xor_mask(payload, payload, length, pool + *pool_pos);
        *pool_pos += 4;
        written += size + length;
        pos += size + length;
        *messages += 1;
        *payload_bytes += length;
    }
    if (*out != NULL && written == 0) {
        Py_CLEAR(*out);
    } else if (*out != NULL && written != PyBytes_GET_SIZE(*out)) {
        if (_PyBytes_Resize(out, written) < 0)
            return -1;
    }
    return pos;
}

/* The upstream scan over data[pos:n] (see scan_upstream). */
static Py_ssize_t
upstream_run(const unsigned char *data, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t room,
             const char *marker_a, Py_ssize_t marker_a_len, const char *marker_b,
             Py_ssize_t marker_b_len, Py_ssize_t *messages, Py_ssize_t *payload_bytes)
{
    *messages = *payload_bytes = 0;
    while (pos < n) {
        Py_ssize_t length;
        int opcode;
        Py_ssize_t size = data_frame_header(data + pos, n - pos, 0, room, &length, &opcode);
        if (size == 0)
            break;
        const unsigned char *payload = data + pos + size;
        if (opcode == OP_TEXT && (contains(payload, length, marker_a, marker_a_len)
                                  || contains(payload, length, marker_b, marker_b_len)))
            break;
        pos += size + length;
        *messages += 1;
        *payload_bytes += length;
    }
    return pos;
}

static PyObject *
scan_client(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "scan_client takes 7 arguments");
        return NULL;
    }
    if (!PyBytes_Check(args[0]) || !PyBytes_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "data and pool must be bytes");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t room = PyLong_AsSsize_t(args[2]);
    Py_ssize_t pool_pos = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    const char *guard_a, *guard_b;
    Py_ssize_t guard_a_len, guard_b_len;
    if (!optional_bytes(args[5], &guard_a, &guard_a_len)
            || !optional_bytes(args[6], &guard_b, &guard_b_len))
        return NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    if (pos < 0 || pos > n || pool_pos < 0 || room < 0) {
        PyErr_SetString(PyExc_ValueError, "position out of range");
        return NULL;
    }
    PyObject *out;
    Py_ssize_t messages, payload_bytes;
    pos = client_run((const unsigned char *)PyBytes_AS_STRING(args[0]), n, pos, room,
                     (const unsigned char *)PyBytes_AS_STRING(args[3]),
                     PyBytes_GET_SIZE(args[3]), &pool_pos, guard_a, guard_a_len, guard_b,
                     guard_b_len, &out, &messages, &payload_bytes);
    if (pos < 0)
        return NULL;
    if (out == NULL) {
        out = Py_None;
        Py_INCREF(out);
    }
    return Py_BuildValue("(nNnnn)", pos, out, messages, payload_bytes, pool_pos);
}

static PyObject *
scan_upstream(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "scan_upstream takes 5 arguments");
        return NULL;
    }
    if (!PyBytes_Check(args[0]) || !PyBytes_Check(args[3]) || !PyBytes_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "data and markers must be bytes");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t room = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred())
        return NULL;
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    const char *marker_a = PyBytes_AS_STRING(args[3]);
    const char *marker_b = PyBytes_AS_STRING(args[4]);
    Py_ssize_t marker_a_len = PyBytes_GET_SIZE(args[3]);
    Py_ssize_t marker_b_len = PyBytes_GET_SIZE(args[4]);
    if (pos < 0 || pos > n || room < 0) {
        PyErr_SetString(PyExc_ValueError, "position out of range");
        return NULL;
    }
    Py_ssize_t messages, payload_bytes;
    pos = upstream_run(data, n, pos, room, marker_a, marker_a_len, marker_b, marker_b_len,
                       &messages, &payload_bytes);
    return Py_BuildValue("(nnn)", pos, messages, payload_bytes);
}

/* -- Receiver: a side's data_received in C ---------------------------------------------- */

/* Receiver(fallback, write, client, room, needle_a, needle_b, urandom)
 *
 * Installed as a relay side's ``data_received`` (an instance attribute, so uvloop and
 * asyncio call it without a Python frame).  A read is handled here, whole, while
 * ``active`` is true — the Python side keeps it true exactly while the side is between
 * frames, has no fragmented message and no pong pending, and the relay is forwarding — and
 * every frame of the read is one the scan takes: then the frames go to ``write`` (the peer
 * transport's: re-masked from the client, as read from the upstream) and the counters
 * ``messages``/``payload_bytes`` grow.  Anything else goes to ``fallback(data)`` — the
 * Python ``data_received`` — with nothing done here.  ``needle_a``/``needle_b``: the
 * client's guarded substrings (None without a guard) or the upstream's usage markers;
 * ``urandom(n)`` refills the masking-key pool (4 KiB at a time).
 */
typedef struct {
    PyObject_HEAD
    PyObject *fallback, *write, *needle_a, *needle_b, *urandom, *pool;
    Py_ssize_t pool_pos;
    Py_ssize_t room;
    int client;
    char active;
    long long messages, payload_bytes;
} Receiver;

#define POOL_BYTES 4096

static int
Receiver_traverse(Receiver *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fallback);
    Py_VISIT(self->write);
    Py_VISIT(self->needle_a);
    Py_VISIT(self->needle_b);
    Py_VISIT(self->urandom);
    Py_VISIT(self->pool);
    return 0;
}

static int
Receiver_clear(Receiver *self)
{
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->write);
    Py_CLEAR(self->needle_a);
    Py_CLEAR(self->needle_b);
    Py_CLEAR(self->urandom);
    Py_CLEAR(self->pool);
    return 0;
}

static void
Receiver_dealloc(Receiver *self)
{
    PyObject_GC_UnTrack(self);
    Receiver_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Receiver_init(Receiver *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fallback", "write", "client", "room", "needle_a", "needle_b",
                             "urandom", NULL};
    PyObject *fallback, *write, *needle_a, *needle_b, *urandom;
    int client;
    Py_ssize_t room;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOpnOOO", kwlist, &fallback, &write,
                                     &client, &room, &needle_a, &needle_b, &urandom))
        return -1;
    if ((needle_a != Py_None && !PyBytes_Check(needle_a))
            || (needle_b != Py_None && !PyBytes_Check(needle_b))
            || (needle_a == Py_None) != (needle_b == Py_None)) {
        PyErr_SetString(PyExc_TypeError, "needles must both be bytes or both None");
        return -1;
    }
    if (!client && needle_a == Py_None) {
        PyErr_SetString(PyExc_TypeError, "the upstream side needs its usage markers");
        return -1;
    }
    if (room < 0) {
        PyErr_SetString(PyExc_ValueError, "room must be >= 0");
        return -1;
    }
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    Py_INCREF(write);
    Py_XSETREF(self->write, write);
    Py_INCREF(needle_a);
    Py_XSETREF(self->needle_a, needle_a);
    Py_INCREF(needle_b);
    Py_XSETREF(self->needle_b, needle_b);
    Py_INCREF(urandom);
    Py_XSETREF(self->urandom, urandom);
    Py_CLEAR(self->pool);
    self->pool_pos = 0;
    self->client = client;
    self->room = room;
    self->active = 0;
    return 0;
}

static PyObject *
Receiver_call(Receiver *self, PyObject *args, PyObject *kwds)
{
    PyObject *data;
    if (kwds != NULL || !PyArg_UnpackTuple(args, "Receiver", 1, 1, &data))
        return NULL;
    if (self->fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Receiver not initialised");
        return NULL;
    }
    if (!self->active || !PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) == 0)
        return PyObject_CallOneArg(self->fallback, data);
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data), messages, payload_bytes, pos;
    PyObject *out = NULL;
    if (self->client) {
        if (self->pool == NULL || PyBytes_GET_SIZE(self->pool) - self->pool_pos < 1024) {
            PyObject *pool = PyObject_CallFunction(self->urandom, "n", (Py_ssize_t)POOL_BYTES);
            if (pool == NULL)
                return NULL;
            if (!PyBytes_CheckExact(pool) || PyBytes_GET_SIZE(pool) != POOL_BYTES) {
                Py_DECREF(pool);
                PyErr_SetString(PyExc_TypeError, "urandom must return bytes of the size asked");
                return NULL;
            }
            Py_XSETREF(self->pool, pool);
            self->pool_pos = 0;
        }
        const char *guard_a = NULL, *guard_b = NULL;
        Py_ssize_t guard_a_len = 0, guard_b_len = 0;
        if (self->needle_a != Py_None) {
            guard_a = PyBytes_AS_STRING(self->needle_a);
            guard_a_len = PyBytes_GET_SIZE(self->needle_a);
            guard_b = PyBytes_AS_STRING(self->needle_b);
            guard_b_len = PyBytes_GET_SIZE(self->needle_b);
        }
        Py_ssize_t pool_pos = self->pool_pos;
        pos = client_run(buf, n, 0, self->room,
                         (const unsigned char *)PyBytes_AS_STRING(self->pool),
                         PyBytes_GET_SIZE(self->pool), &pool_pos, guard_a, guard_a_len,
                         guard_b, guard_b_len, &out, &messages, &payload_bytes);
        if (pos < 0)
            return NULL;
        if (pos != n) {
            Py_XDECREF(out);
            return PyObject_CallOneArg(self->fallback, data);
        }
        self->pool_pos = pool_pos;
    } else {
        pos = upstream_run(buf, n, 0, self->room, PyBytes_AS_STRING(self->needle_a),
                           PyBytes_GET_SIZE(self->needle_a), PyBytes_AS_STRING(self->needle_b),
                           PyBytes_GET_SIZE(self->needle_b), &messages, &payload_bytes);
        if (pos != n)
            return PyObject_CallOneArg(self->fallback, data);
        out = data;
        Py_INCREF(out);
    }
    self->messages += messages;
    self->payload_bytes += payload_bytes;
    PyObject *result = PyObject_CallOneArg(self->write, out);
    Py_DECREF(out);
    if (result == NULL)
        return NULL;
    Py_DECREF(result);
    Py_RETURN_NONE;
}

static PyMemberDef Receiver_members[] = {
    {"messages", T_LONGLONG, offsetof(Receiver, messages), READONLY,
     "messages forwarded by this receiver (the fallback's are counted in Python)"},
    {"payload_bytes", T_LONGLONG, offsetof(Receiver, payload_bytes), READONLY,
     "payload bytes of those messages"},
    {"active", T_BOOL, offsetof(Receiver, active), 0,
     "whether reads may be handled here (false: every read goes to the fallback)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway._framescan.Receiver",
    .tp_doc = "A relay side's data_received in C; see gateway/_framescan.c.",
    .tp_basicsize = sizeof(Receiver),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Receiver_init,
    .tp_dealloc = (destructor)Receiver_dealloc,
    .tp_traverse = (traverseproc)Receiver_traverse,
    .tp_clear = (inquiry)Receiver_clear,
    .tp_call = (ternaryfunc)Receiver_call,
    .tp_members = Receiver_members,
};

static PyMethodDef methods[] = {
    {"scan_client", (PyCFunction)(void (*)(void))scan_client, METH_FASTCALL,
     "scan_client(data, pos, room, pool, pool_pos, guarded_a, guarded_b)"
     " -> (pos, out, messages, payload_bytes, pool_pos)"},
    {"scan_upstream", (PyCFunction)(void (*)(void))scan_upstream, METH_FASTCALL,
     "scan_upstream(data, pos, room, marker_a, marker_b) -> (pos, messages, payload_bytes)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gateway._framescan",
    "The relay's frame scan in C; see gateway/relay.py (FRAMESCAN).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__framescan(void)
{
    if (PyType_Ready(&ReceiverType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ReceiverType);
    if (PyModule_AddObject(m, "Receiver", (PyObject *)&ReceiverType) < 0) {
        Py_DECREF(&ReceiverType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
