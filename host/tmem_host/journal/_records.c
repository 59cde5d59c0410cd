/*
 * Journal records for many pages in one call (docs/RELIABILITY.md's format).
 *
 * tmem_host.journal.codec is the format's reference: put_record() and
 * encode(FlushPageRecord) make one record per Python call, about a microsecond
 * of interpreter work per page on tmemd's event-loop thread (docs/PERFORMANCE.md).
 * These functions make the same bytes for a whole batch or object:
 *
 *     crc32 u32 | magic u16 | type u8 | reserved u8 | body length u32 | body
 *     PUT           pool u8, oid 3 x u64, index u64, tag u8, stored page
 *     FLUSH_PAGE    pool u8, oid 3 x u64, index u64
 *     FLUSH_OBJECT  pool u8, oid 3 x u64
 *     REMOTE        pool u8, oid 3 x u64, index u64, version u64, size u32
 *
 * little-endian, the crc32 (zlib's CRC-32, as Python's zlib.crc32) over
 * everything after it. A stored page that is an int is a fill word (tag FILL,
 * 8 bytes), bytes are data (tag DATA), a RemotePage makes a REMOTE record; any
 * other value (a dedup blob) is handed to the caller's `special(oid, index,
 * value)`, which returns its record's bytes. tests/journal/test_records.py
 * compares every record with the codec's, byte for byte.
 *
 * The CRC is ISA-L's crc32_gzip_refl (Debian's libisal-dev): zlib's CRC-32,
 * computed with PCLMULQDQ where the CPU has it (0.05 us for a 2.4 KiB record,
 * zlib 1.2.13 0.7 us; docs/PERFORMANCE.md). `crc32` gives it to Python (the
 * codec, save files); tests/journal/test_records.py checks it against zlib.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <isa-l/crc.h>

#define MAGIC 0x4A54
#define TYPE_PUT 2
#define TYPE_FLUSH_PAGE 3
#define TYPE_FLUSH_OBJECT 4
#define TYPE_REMOTE 8
#define WHOLE_OBJECT UINT64_MAX  /* the ABI's index for "the whole object" */
#define TAG_FILL 0
#define TAG_DATA 1
#define HEADER_SIZE 12  /* crc, magic, type, reserved, body length */
#define KEY_SIZE 33     /* pool u8, oid 3 x u64, index u64 */
#define OBJECT_KEY_SIZE 25  /* pool u8, oid 3 x u64 */

struct out {
    char *data;
    size_t length, capacity;
};

static int
reserve(struct out *out, size_t more)
{
    if (out->length + more <= out->capacity) {
        return 0;
    }
    size_t capacity = out->capacity ? out->capacity : 64 * 1024;
    while (capacity < out->length + more) {
        capacity *= 2;
    }
    char *data = PyMem_Realloc(out->data, capacity);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->data = data;
    out->capacity = capacity;
    return 0;
}

static void
put_le(unsigned char *p, uint64_t value, int bytes)
{
    for (int i = 0; i < bytes; i++) {
        p[i] = (unsigned char)(value >> (8 * i));
    }
}

struct key {
    uint64_t oid[3];
    uint64_t index;
};

/* (oid, index) from Python: oid a 3-tuple of ints, index an int; -1 on error. */
static int
parse_key(PyObject *oid, PyObject *index, struct key *key)
{
    if (!PyTuple_Check(oid) || PyTuple_GET_SIZE(oid) != 3) {
        PyErr_SetString(PyExc_TypeError, "an oid is a tuple of three ints");
        return -1;
    }
    for (int i = 0; i < 3; i++) {
        key->oid[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(oid, i));
        if (key->oid[i] == (uint64_t)-1 && PyErr_Occurred()) {
            return -1;
        }
    }
    key->index = PyLong_AsUnsignedLongLong(index);
    if (key->index == (uint64_t)-1 && PyErr_Occurred()) {
        return -1;
    }
    return 0;
}

/* A key (oid, index) from Python: its two parts, borrowed; -1 on error. */
static int
split_key(PyObject *key, PyObject **oid, PyObject **index)
{
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 2) {
        PyErr_SetString(PyExc_TypeError, "a key is an (oid, index) tuple");
        return -1;
    }
    *oid = PyTuple_GET_ITEM(key, 0);
    *index = PyTuple_GET_ITEM(key, 1);
    return 0;
}

/* One record: header, key (FLUSH_OBJECT: without the index), then the tag (PUT)
 * and `data` (PUT: the stored page; REMOTE: version and size). */
static int
append_record(struct out *out, int type, int pool_id, const struct key *key, int tag,
              const char *data, size_t data_length)
{
    size_t key_size = type == TYPE_FLUSH_OBJECT ? OBJECT_KEY_SIZE : KEY_SIZE;
    size_t body = key_size + (type == TYPE_PUT) + data_length;
    if (reserve(out, HEADER_SIZE + body) < 0) {
        return -1;
    }
    unsigned char *record = (unsigned char *)out->data + out->length;
    unsigned char *p = record + 4;
    put_le(p, MAGIC, 2);
    p[2] = (unsigned char)type;
    p[3] = 0;
    put_le(p + 4, body, 4);
    p += 8;
    p[0] = (unsigned char)pool_id;
    for (int i = 0; i < 3; i++) {
        put_le(p + 1 + 8 * i, key->oid[i], 8);
    }
    if (type != TYPE_FLUSH_OBJECT) {
        put_le(p + 25, key->index, 8);
    }
    p += key_size;
    if (type == TYPE_PUT) {
        *p++ = (unsigned char)tag;
    }
    if (data_length) {
        memcpy(p, data, data_length);
    }
    uint32_t crc = crc32_gzip_refl(0, record + 4, (uint64_t)(HEADER_SIZE - 4 + body));
    put_le(record, crc, 4);
    out->length += HEADER_SIZE + body;
    return 0;
}

/* tmem_host.store.tier.RemotePage, looked up when the module is loaded. */
static PyObject *remote_page_type;

/* The REMOTE record of a page in the remote tier: its version and size. */
static int
append_remote(struct out *out, int pool_id, const struct key *key, PyObject *page)
{
    unsigned char tail[12];
    PyObject *version = PyObject_GetAttrString(page, "version");
    if (version == NULL) {
        return -1;
    }
    uint64_t version_value = PyLong_AsUnsignedLongLong(version);
    Py_DECREF(version);
    if (version_value == (uint64_t)-1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *nbytes = PyObject_GetAttrString(page, "nbytes");
    if (nbytes == NULL) {
        return -1;
    }
    unsigned long long nbytes_value = PyLong_AsUnsignedLongLong(nbytes);
    Py_DECREF(nbytes);
    if (nbytes_value == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    if (nbytes_value > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "a remote page's size is a u32");
        return -1;
    }
    put_le(tail, version_value, 8);
    put_le(tail + 8, nbytes_value, 4);
    return append_record(out, TYPE_REMOTE, pool_id, key, 0, (const char *)tail, sizeof tail);
}

/* The PUT record of a stored page, the REMOTE record of a page in the remote
 * tier, or `special`'s bytes for another value (a dedup blob). */
static int
append_put(struct out *out, int pool_id, PyObject *oid, PyObject *index, PyObject *value,
           PyObject *special)
{
    struct key key;
    if (PyLong_CheckExact(value)) {
        unsigned char word[8];
        uint64_t fill = PyLong_AsUnsignedLongLong(value);
        if ((fill == (uint64_t)-1 && PyErr_Occurred()) || parse_key(oid, index, &key) < 0) {
            return -1;
        }
        put_le(word, fill, 8);
        return append_record(out, TYPE_PUT, pool_id, &key, TAG_FILL, (const char *)word, 8);
    }
    if (PyBytes_CheckExact(value)) {
        if (parse_key(oid, index, &key) < 0) {
            return -1;
        }
        return append_record(out, TYPE_PUT, pool_id, &key, TAG_DATA, PyBytes_AS_STRING(value),
                             (size_t)PyBytes_GET_SIZE(value));
    }
    if (Py_IS_TYPE(value, (PyTypeObject *)remote_page_type)) {
        if (parse_key(oid, index, &key) < 0) {
            return -1;
        }
        return append_remote(out, pool_id, &key, value);
    }
    PyObject *record = PyObject_CallFunctionObjArgs(special, oid, index, value, NULL);
    if (record == NULL) {
        return -1;
    }
    if (!PyBytes_Check(record)) {
        Py_DECREF(record);
        PyErr_SetString(PyExc_TypeError, "special() must return the record's bytes");
        return -1;
    }
    int result = reserve(out, (size_t)PyBytes_GET_SIZE(record));
    if (result == 0) {
        memcpy(out->data + out->length, PyBytes_AS_STRING(record), (size_t)PyBytes_GET_SIZE(record));
        out->length += (size_t)PyBytes_GET_SIZE(record);
    }
    Py_DECREF(record);
    return result;
}

static PyObject *
finish(struct out *out, Py_ssize_t records)
{
    PyObject *blob = PyBytes_FromStringAndSize(out->data ? out->data : "", (Py_ssize_t)out->length);
    PyMem_Free(out->data);
    if (blob == NULL) {
        return NULL;
    }
    return Py_BuildValue("(Nn)", blob, records);
}

static int
check_pool(int pool_id)
{
    if (pool_id < 0 || pool_id > 255) {
        PyErr_SetString(PyExc_ValueError, "a pool id is a byte");
        return -1;
    }
    return 0;
}

static PyObject *
batch_records(PyObject *module, PyObject *args)
{
    int pool_id;
    PyObject *keys, *statuses, *objects, *ok, *invalid, *special;
    if (!PyArg_ParseTuple(args, "iOOO!OOO:batch_records", &pool_id, &keys, &statuses, &PyDict_Type,
                          &objects, &ok, &invalid, &special) || check_pool(pool_id) < 0) {
        return NULL;
    }
    PyObject *key_list = PySequence_Fast(keys, "keys must be a sequence");
    if (key_list == NULL) {
        return NULL;
    }
    PyObject *status_list = PySequence_Fast(statuses, "statuses must be a sequence");
    if (status_list == NULL) {
        Py_DECREF(key_list);
        return NULL;
    }
    struct out out = {NULL, 0, 0};
    Py_ssize_t records = 0;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(key_list);
    if (PySequence_Fast_GET_SIZE(status_list) != count) {
        PyErr_SetString(PyExc_ValueError, "keys and statuses differ in length");
        goto error;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *status = PySequence_Fast_GET_ITEM(status_list, i);
        PyObject *oid, *index;
        if (split_key(PySequence_Fast_GET_ITEM(key_list, i), &oid, &index) < 0) {
            goto error;
        }
        int is_ok = PyObject_RichCompareBool(status, ok, Py_EQ);
        if (is_ok < 0) {
            goto error;
        }
        if (is_ok) {
            /* The page the store holds now: the last put of the key wins. */
            PyObject *obj = PyDict_GetItemWithError(objects, oid);
            PyObject *value = obj == NULL ? NULL : PyObject_GetItem(obj, index);
            if (value == NULL) {
                if (!PyErr_Occurred()) {
                    PyErr_SetString(PyExc_KeyError, "a page put OK is not in the pool");
                }
                goto error;
            }
            int result = append_put(&out, pool_id, oid, index, value, special);
            Py_DECREF(value);
            if (result < 0) {
                goto error;
            }
        } else {
            int is_invalid = PyObject_RichCompareBool(status, invalid, Py_EQ);
            if (is_invalid < 0) {
                goto error;
            }
            if (is_invalid) {
                continue;  /* nothing changed */
            }
            /* Refused: the store dropped the key's older copy, and so must a replay. */
            struct key parsed;
            if (parse_key(oid, index, &parsed) < 0
                    || append_record(&out, TYPE_FLUSH_PAGE, pool_id, &parsed, 0, NULL, 0) < 0) {
                goto error;
            }
        }
        records++;
    }
    Py_DECREF(key_list);
    Py_DECREF(status_list);
    return finish(&out, records);
error:
    PyMem_Free(out.data);
    Py_DECREF(key_list);
    Py_DECREF(status_list);
    return NULL;
}

static PyObject *
flush_records(PyObject *module, PyObject *args)
{
    int pool_id;
    PyObject *keys;
    if (!PyArg_ParseTuple(args, "iO:flush_records", &pool_id, &keys) || check_pool(pool_id) < 0) {
        return NULL;
    }
    PyObject *key_list = PySequence_Fast(keys, "keys must be a sequence");
    if (key_list == NULL) {
        return NULL;
    }
    struct out out = {NULL, 0, 0};
    Py_ssize_t count = PySequence_Fast_GET_SIZE(key_list);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *oid, *index;
        struct key parsed;
        if (split_key(PySequence_Fast_GET_ITEM(key_list, i), &oid, &index) < 0
                || parse_key(oid, index, &parsed) < 0
                || append_record(&out, parsed.index == WHOLE_OBJECT ? TYPE_FLUSH_OBJECT : TYPE_FLUSH_PAGE,
                                 pool_id, &parsed, 0, NULL, 0) < 0) {
            goto error;
        }
    }
    Py_DECREF(key_list);
    return finish(&out, count);
error:
    PyMem_Free(out.data);
    Py_DECREF(key_list);
    return NULL;
}

static PyObject *
object_records(PyObject *module, PyObject *args)
{
    int pool_id;
    PyObject *oid, *pages, *special;
    Py_ssize_t position, limit;
    if (!PyArg_ParseTuple(args, "iOO!Onn:object_records", &pool_id, &oid, &PyDict_Type, &pages, &special,
                          &position, &limit) || check_pool(pool_id) < 0) {
        return NULL;
    }
    if (position < 0 || limit < 1) {
        PyErr_SetString(PyExc_ValueError, "start from a position of 0 or more, at least one record");
        return NULL;
    }
    struct out out = {NULL, 0, 0};
    Py_ssize_t records = 0;
    PyObject *index, *value;
    /* `position` is PyDict_Next's: the caller must not change the dict between calls. */
    while (records < limit && PyDict_Next(pages, &position, &index, &value)) {
        if (value == Py_None) {
            continue;  /* no page: one the caller listed was flushed since (compaction in slices) */
        }
        /* special() may run Python: hold what the dict lends across it. */
        Py_INCREF(index);
        Py_INCREF(value);
        int result = append_put(&out, pool_id, oid, index, value, special);
        Py_DECREF(index);
        Py_DECREF(value);
        if (result < 0) {
            PyMem_Free(out.data);
            return NULL;
        }
        records++;
    }
    PyObject *result = finish(&out, records);
    if (result == NULL) {
        return NULL;
    }
    /* Where to go on from, or None: no page is left after this call's. */
    PyObject *next = records < limit || !PyDict_Next(pages, &(Py_ssize_t){position}, &index, &value)
        ? Py_NewRef(Py_None) : PyLong_FromSsize_t(position);
    if (next == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    PyObject *triple = Py_BuildValue("(OON)", PyTuple_GET_ITEM(result, 0), PyTuple_GET_ITEM(result, 1), next);
    Py_DECREF(result);
    return triple;
}

static PyObject *
crc32_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "crc32 takes data and an optional value");
        return NULL;
    }
    unsigned long value = 0;
    if (nargs == 2) {
        value = PyLong_AsUnsignedLongMask(args[1]);
        if (value == (unsigned long)-1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    uint32_t crc;
    if (data.len >= 64 * 1024) {  /* a save file's section: let other threads run */
        Py_BEGIN_ALLOW_THREADS
        crc = crc32_gzip_refl((uint32_t)value, data.buf, (uint64_t)data.len);
        Py_END_ALLOW_THREADS
    } else {
        crc = crc32_gzip_refl((uint32_t)value, data.buf, (uint64_t)data.len);
    }
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

static PyMethodDef methods[] = {
    {"crc32", (PyCFunction)(void (*)(void))crc32_py, METH_FASTCALL,
     "crc32(data, value=0) -> int\n\n"
     "zlib.crc32's CRC-32 of `data` (any buffer), continuing from `value`."},
    {"batch_records", batch_records, METH_VARARGS,
     "batch_records(pool_id, keys, statuses, objects, ok, invalid, special) -> (bytes, records)\n\n"
     "A put_many's records: for each key (oid, index), a PUT of what `objects`\n"
     "(the pool's oid -> {index: value}) holds if its status equals `ok`, nothing if\n"
     "it equals `invalid`, else a FLUSH_PAGE."},
    {"flush_records", flush_records, METH_VARARGS,
     "flush_records(pool_id, keys) -> (bytes, records)\n\n"
     "A flush_many's records: for each key (oid, index), a FLUSH_PAGE, or a\n"
     "FLUSH_OBJECT if the index is the ABI's WHOLE_OBJECT."},
    {"object_records", object_records, METH_VARARGS,
     "object_records(pool_id, oid, pages, special, position, limit) -> (bytes, records, next)\n\n"
     "PUT records for the pages of one object (`pages`: index -> value; None\n"
     "values are skipped), at most `limit` of them from `position` (0 first; then\n"
     "the `next` returned, None at the end), so that an object of any size costs\n"
     "bounded memory per call."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tmem_host.journal._records",
    "Journal records for many pages in one call (docs/RELIABILITY.md).", -1, methods,
};

PyMODINIT_FUNC
PyInit__records(void)
{
    PyObject *tier = PyImport_ImportModule("tmem_host.store.tier");
    if (tier == NULL) {
        return NULL;
    }
    remote_page_type = PyObject_GetAttrString(tier, "RemotePage");
    Py_DECREF(tier);
    if (remote_page_type == NULL) {
        return NULL;
    }
    if (!PyType_Check(remote_page_type)) {
        PyErr_SetString(PyExc_TypeError, "tmem_host.store.tier.RemotePage is not a class");
        return NULL;
    }
    return PyModule_Create(&module);
}
