/*
 * The remote tier's values (docs/REMOTE.md, "Values"), made and checked in C.
 *
 * A value is a 32-byte header and the page's stored form:
 *
 *     magic "TMR2" | tag u8 | 3 reserved | version u64 | digest 16 bytes | data
 *
 * little-endian, the reserved bytes zero; tag 0 is a fill word (data: 8 bytes, u64), tag 1 data (an lz4
 * block or a raw page, as the store keeps it). The digest is XXH3-128 (xxHash
 * 0.8, Debian's libxxhash-dev, header only) in canonical (big-endian) form over
 *
 *     key length u32 | key | version u64 | tag u8 | data
 *
 * so a value under another key, of another version, or damaged anywhere is
 * not this key's copy: decode_value returns None (a miss, EIO to the guest).
 * The first format, "TMR1" (BLAKE2b-128 keyed with the key), is still read by
 * tier.py in Python; only TMR2 is written. BLAKE2b in Python cost 2.1-2.2 us a
 * value each way; this is a tenth of that (docs/PERFORMANCE.md).
 *
 * tests/remote/test_values.py checks these bytes against the `xxhash` package.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define HEADER_SIZE 32
#define MAGIC "TMR2"
#define TAG_FILL 0
#define TAG_DATA 1
#define FILL_SIZE 8

static void
put_u64(unsigned char *at, uint64_t value)
{
    for (int i = 0; i < 8; i++) {
        at[i] = (unsigned char)(value >> (8 * i));
    }
}

static uint64_t
get_u64(const unsigned char *at)
{
    uint64_t value = 0;
    for (int i = 7; i >= 0; i--) {
        value = (value << 8) | at[i];
    }
    return value;
}

static void
digest(unsigned char out[16], const char *key, Py_ssize_t key_length, uint64_t version,
       unsigned char tag, const unsigned char *data, size_t data_length)
{
    XXH3_state_t state;
    unsigned char length[4], version_bytes[8];
    uint32_t key_length32 = (uint32_t)key_length;
    for (int i = 0; i < 4; i++) {
        length[i] = (unsigned char)(key_length32 >> (8 * i));
    }
    put_u64(version_bytes, version);
    XXH3_INITSTATE(&state);
    XXH3_128bits_reset(&state);
    XXH3_128bits_update(&state, length, sizeof length);
    XXH3_128bits_update(&state, key, (size_t)key_length);
    XXH3_128bits_update(&state, version_bytes, sizeof version_bytes);
    XXH3_128bits_update(&state, &tag, 1);
    XXH3_128bits_update(&state, data, data_length);
    XXH128_canonical_t canonical;
    XXH128_canonicalFromHash(&canonical, XXH3_128bits_digest(&state));
    memcpy(out, canonical.digest, 16);
}

/* The (key, version, third) arguments both functions take. */
static int
key_and_version(PyObject *const *args, Py_ssize_t nargs, const char *usage, uint64_t *version)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "key must be bytes");
        return -1;
    }
    if (!PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "version must be an int");
        return -1;
    }
    *version = PyLong_AsUnsignedLongLong(args[1]);
    return (*version == (uint64_t)-1 && PyErr_Occurred()) ? -1 : 0;
}

PyDoc_STRVAR(encode_value_doc,
"encode_value(key: bytes, version: int, stored: bytes | int) -> bytes\n\n"
"The TMR2 value of ``stored`` (data bytes, or an int: a fill word) under ``key``.");

static PyObject *
encode_value(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t version;
    if (key_and_version(args, nargs, "encode_value takes key, version, stored", &version) < 0) {
        return NULL;
    }
    unsigned char fill[FILL_SIZE];
    const unsigned char *data;
    size_t data_length;
    unsigned char tag;
    if (PyBytes_Check(args[2])) {
        tag = TAG_DATA;
        data = (const unsigned char *)PyBytes_AS_STRING(args[2]);
        data_length = (size_t)PyBytes_GET_SIZE(args[2]);
    } else if (PyLong_Check(args[2])) {
        uint64_t word = PyLong_AsUnsignedLongLong(args[2]);
        if (word == (uint64_t)-1 && PyErr_Occurred()) {
            return NULL;
        }
        tag = TAG_FILL;
        put_u64(fill, word);
        data = fill;
        data_length = FILL_SIZE;
    } else {
        PyErr_SetString(PyExc_TypeError, "stored must be bytes or an int");
        return NULL;
    }
    PyObject *value = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(HEADER_SIZE + data_length));
    if (value == NULL) {
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(value);
    memcpy(out, MAGIC, 4);
    out[4] = tag;
    memset(out + 5, 0, 3);
    put_u64(out + 8, version);
    digest(out + 16, PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]), version, tag,
           data, data_length);
    memcpy(out + HEADER_SIZE, data, data_length);
    return value;
}

PyDoc_STRVAR(decode_value_doc,
"decode_value(key: bytes, version: int, value: bytes | None) -> bytes | int | None\n\n"
"The stored form in a TMR2 ``value``, or None unless it is exactly this key's copy\n"
"of this version (missing, damaged, another key's, an older one, another format).");

static PyObject *
decode_value(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t version;
    if (key_and_version(args, nargs, "decode_value takes key, version, value", &version) < 0) {
        return NULL;
    }
    if (args[2] == Py_None) {
        Py_RETURN_NONE;
    }
    if (!PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "value must be bytes or None");
        return NULL;
    }
    const unsigned char *value = (const unsigned char *)PyBytes_AS_STRING(args[2]);
    Py_ssize_t length = PyBytes_GET_SIZE(args[2]);
    if (length < HEADER_SIZE || memcmp(value, MAGIC, 4) != 0 || get_u64(value + 8) != version) {
        Py_RETURN_NONE;
    }
    unsigned char tag = value[4];
    size_t data_length = (size_t)(length - HEADER_SIZE);
    if (tag > TAG_DATA || (tag == TAG_FILL && data_length != FILL_SIZE)
            || value[5] || value[6] || value[7]) {  /* the reserved bytes are written zero */
        Py_RETURN_NONE;
    }
    unsigned char expected[16];
    digest(expected, PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]), version, tag,
           value + HEADER_SIZE, data_length);
    if (memcmp(expected, value + 16, 16) != 0) {
        Py_RETURN_NONE;
    }
    if (tag == TAG_FILL) {
        return PyLong_FromUnsignedLongLong(get_u64(value + HEADER_SIZE));
    }
    return PyBytes_FromStringAndSize((const char *)value + HEADER_SIZE, (Py_ssize_t)data_length);
}

static PyMethodDef methods[] = {
    {"encode_value", (PyCFunction)(void (*)(void))encode_value, METH_FASTCALL, encode_value_doc},
    {"decode_value", (PyCFunction)(void (*)(void))decode_value, METH_FASTCALL, decode_value_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tmem_host.remote._values",
    .m_doc = "The remote tier's TMR2 values: header, XXH3-128 digest, stored page.",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__values(void)
{
    return PyModule_Create(&module_def);
}
