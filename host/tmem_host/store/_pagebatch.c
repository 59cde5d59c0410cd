/*
 * Batches of pages to their stored forms without the GIL.
 *
 * A stored form is what tmem_host.store.pagecodec.encode_page makes of a page:
 * its fill word (int) if the page is one 8-byte word repeated, else its lz4
 * block (bytes shorter than the page), else the raw page (bytes of page
 * length). This module makes the same forms by the same rules for a whole
 * contiguous batch, with Debian's liblz4 (LZ4_compress_default, as python-lz4's
 * default mode):
 *
 * - encode_pages(pages, page_size, compress): in the calling thread, the GIL
 *   released once for the batch instead of once per page;
 * - Encoder(threads).submit(pages, page_size, compress) -> Job: on threads of
 *   its own that never take the GIL, so that they compress on a second core
 *   while the event loop runs Python; Job.forms() waits for the job and builds
 *   the forms (the Python objects) in the caller's thread.
 *
 * Why native threads: python-lz4 takes and drops the GIL around every page
 * (about 3 us of C work), and a Python thread needs the GIL again for its own
 * bookkeeping (a future, a queue), so a Python encoder thread spent its time
 * waiting for the event loop to let go of the GIL (docs/PERFORMANCE.md).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <lz4.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define FILL_WORD_BYTES 8
#define MIN_PAGE_SIZE 16
#define MAX_THREADS 8

/* ------------------------------------------------------------------ a batch */

enum form { FORM_FILL, FORM_LZ4, FORM_RAW };

struct encoded {
    enum form form;
    uint64_t word;  /* FORM_FILL */
    int length;     /* FORM_LZ4: bytes at the page's slot in the scratch buffer */
};

struct batch {
    Py_buffer view;  /* the pages, held (and so kept alive) until batch_free */
    int has_view;
    Py_ssize_t count, page_size;
    int compress, bound;
    char *scratch;   /* count slots of `bound` bytes: lz4's worst case */
    struct encoded *encoded;
};

static uint64_t
load_le64(const unsigned char *p)
{
    uint64_t word = 0;
    for (int i = FILL_WORD_BYTES - 1; i >= 0; i--) {
        word = (word << 8) | p[i];
    }
    return word;
}

/* A page size both directions handle: whole fill words, within lz4's input limit. */
static int
check_page_size(Py_ssize_t page_size)
{
    if (page_size < MIN_PAGE_SIZE || page_size % FILL_WORD_BYTES != 0 || page_size > LZ4_MAX_INPUT_SIZE) {
        PyErr_Format(PyExc_ValueError, "page size %zd is not a multiple of %d from %d to %d",
                     page_size, FILL_WORD_BYTES, MIN_PAGE_SIZE, LZ4_MAX_INPUT_SIZE);
        return -1;
    }
    return 0;
}

static void
batch_free(struct batch *b)
{
    PyMem_RawFree(b->scratch);
    PyMem_RawFree(b->encoded);
    b->scratch = NULL;
    b->encoded = NULL;
    if (b->has_view) {
        PyBuffer_Release(&b->view);
        b->has_view = 0;
    }
}

/* With the GIL: take the pages and allocate; -1 with an exception set. */
static int
batch_init(struct batch *b, PyObject *pages, Py_ssize_t page_size, int compress)
{
    memset(b, 0, sizeof(*b));
    if (check_page_size(page_size) < 0) {
        return -1;
    }
    if (PyObject_GetBuffer(pages, &b->view, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    b->has_view = 1;
    if (b->view.len % page_size != 0) {
        PyErr_Format(PyExc_ValueError, "%zd bytes are not whole pages of %zd", b->view.len, page_size);
        batch_free(b);
        return -1;
    }
    b->count = b->view.len / page_size;
    b->page_size = page_size;
    b->compress = compress;
    b->bound = LZ4_compressBound((int)page_size);
    size_t slots = (size_t)(b->count ? b->count : 1);
    b->encoded = PyMem_RawMalloc(slots * sizeof(*b->encoded));
    b->scratch = compress ? PyMem_RawMalloc(slots * (size_t)b->bound) : NULL;
    if (b->encoded == NULL || (compress && b->scratch == NULL)) {
        batch_free(b);
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Without the GIL: no Python object is touched. */
static void
batch_encode(struct batch *b)
{
    const unsigned char *pages = b->view.buf;
    Py_ssize_t page_size = b->page_size;
    for (Py_ssize_t i = 0; i < b->count; i++) {
        const unsigned char *page = pages + i * page_size;
        struct encoded *out = &b->encoded[i];
        /* Every word equal to the next: the page is one word repeated. */
        if (memcmp(page, page + FILL_WORD_BYTES, (size_t)(page_size - FILL_WORD_BYTES)) == 0) {
            out->form = FORM_FILL;
            out->word = load_le64(page);
            continue;
        }
        out->form = FORM_RAW;
        if (b->compress) {
            /* Room for lz4's worst case: with less, lz4 switches to its
             * limited-output mode, whose blocks differ from python-lz4's. A
             * block not shorter than the page is not kept (encode_page's rule). */
            int length = LZ4_compress_default((const char *)page, b->scratch + i * b->bound,
                                              (int)page_size, b->bound);
            if (length > 0 && length < page_size) {
                out->form = FORM_LZ4;
                out->length = length;
            }
        }
    }
}

/* With the GIL: the forms as a list of int | bytes. */
static PyObject *
batch_forms(const struct batch *b)
{
    PyObject *result = PyList_New(b->count);
    if (result == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < b->count; i++) {
        const struct encoded *encoded = &b->encoded[i];
        PyObject *item;
        switch (encoded->form) {
        case FORM_FILL:
            item = PyLong_FromUnsignedLongLong(encoded->word);
            break;
        case FORM_LZ4:
            item = PyBytes_FromStringAndSize(b->scratch + i * b->bound, encoded->length);
            break;
        default:
            item = PyBytes_FromStringAndSize((const char *)b->view.buf + i * b->page_size, b->page_size);
            break;
        }
        if (item == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyList_SET_ITEM(result, i, item);
    }
    return result;
}

static PyObject *
encode_pages(PyObject *module, PyObject *args)
{
    PyObject *pages;
    Py_ssize_t page_size;
    int compress;
    struct batch b;
    if (!PyArg_ParseTuple(args, "Onp:encode_pages", &pages, &page_size, &compress)
            || batch_init(&b, pages, page_size, compress) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    batch_encode(&b);
    Py_END_ALLOW_THREADS
    PyObject *result = batch_forms(&b);
    batch_free(&b);
    return result;
}

/* An lz4 block to decompress: its form (a reference held across the GIL
 * release, whatever another thread does to the list), its length, its page. */
struct block {
    PyObject *form;
    int length;
    char *page;
};

static void
release_blocks(struct block *blocks, Py_ssize_t count)
{
    for (Py_ssize_t b = 0; b < count; b++) {
        Py_DECREF(blocks[b].form);
    }
    PyMem_RawFree(blocks);
}

/* The page of each stored form (int: fill word; bytes of page length: the page
 * itself, returned as it is; shorter bytes: an lz4 block), the lz4 blocks
 * decompressed with the GIL released once for the batch. */
static PyObject *
decode_pages(PyObject *module, PyObject *args)
{
    PyObject *forms;
    Py_ssize_t page_size;
    if (!PyArg_ParseTuple(args, "O!n:decode_pages", &PyList_Type, &forms, &page_size)) {
        return NULL;
    }
    if (check_page_size(page_size) < 0) {
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(forms);
    PyObject *pages = PyList_New(count);
    if (pages == NULL) {
        return NULL;
    }
    struct block *blocks = NULL;
    Py_ssize_t block_count = 0;
    blocks = PyMem_RawMalloc((size_t)(count ? count : 1) * sizeof(*blocks));
    if (blocks == NULL) {
        Py_DECREF(pages);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *form = PyList_GET_ITEM(forms, i);
        PyObject *page;
        if (PyLong_CheckExact(form)) {
            uint64_t word = PyLong_AsUnsignedLongLong(form);
            if (word == (uint64_t)-1 && PyErr_Occurred()) {
                goto error;
            }
            page = PyBytes_FromStringAndSize(NULL, page_size);
            if (page == NULL) {
                goto error;
            }
            unsigned char *p = (unsigned char *)PyBytes_AS_STRING(page);
            for (int b = 0; b < FILL_WORD_BYTES; b++) {
                p[b] = (unsigned char)(word >> (8 * b));
            }
            for (Py_ssize_t filled = FILL_WORD_BYTES; filled < page_size; filled *= 2) {
                memcpy(p + filled, p, (size_t)(filled * 2 <= page_size ? filled : page_size - filled));
            }
        } else if (PyBytes_CheckExact(form) && PyBytes_GET_SIZE(form) == page_size) {
            page = Py_NewRef(form);  /* the raw page: bytes are immutable, no copy */
        } else if (PyBytes_CheckExact(form) && PyBytes_GET_SIZE(form) < page_size) {
            page = PyBytes_FromStringAndSize(NULL, page_size);
            if (page == NULL) {
                goto error;
            }
            blocks[block_count].form = Py_NewRef(form);
            blocks[block_count].length = (int)PyBytes_GET_SIZE(form);
            blocks[block_count].page = PyBytes_AS_STRING(page);
            block_count++;
        } else {
            PyErr_Format(PyExc_TypeError, "form %zd is not a stored page of %zd bytes", i, page_size);
            goto error;
        }
        PyList_SET_ITEM(pages, i, page);
    }
    Py_ssize_t bad = -1;
    /* The forms are held and immutable, the pages are not shared yet: nothing
     * can change under the decompression while the GIL is released. */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < block_count; b++) {
        if (LZ4_decompress_safe(PyBytes_AS_STRING(blocks[b].form), blocks[b].page, blocks[b].length,
                                (int)page_size) != page_size) {
            bad = b;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    release_blocks(blocks, block_count);
    if (bad >= 0) {
        Py_DECREF(pages);
        PyErr_Format(PyExc_ValueError, "an lz4 block (the %zd-th of the batch) does not decode to a page", bad);
        return NULL;
    }
    return pages;
error:
    release_blocks(blocks, block_count);
    Py_DECREF(pages);  /* the unset items are NULL: list dealloc skips them */
    return NULL;
}

/* ------------------------------------------------------ the encoder threads */

typedef struct job Job;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;  /* guards everything below and every job's state and next */
    pthread_cond_t work;   /* a job was queued, or the encoder is closing */
    pthread_cond_t done;   /* a job finished or was cancelled */
    Job *head, *tail;      /* queued jobs, oldest first */
    int threads_wanted, threads_started, closing;
    pthread_t threads[MAX_THREADS];
} Encoder;

enum job_state { JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_CANCELLED, JOB_TAKEN };

struct job {
    PyObject_HEAD
    struct batch batch;
    Encoder *encoder;  /* a strong reference: the encoder outlives its jobs */
    Job *next;
    enum job_state state;
};

static void *
encoder_thread(void *arg)
{
    Encoder *encoder = arg;
    pthread_mutex_lock(&encoder->lock);
    for (;;) {
        while (encoder->head == NULL && !encoder->closing) {
            pthread_cond_wait(&encoder->work, &encoder->lock);
        }
        Job *job = encoder->head;
        if (job == NULL) {
            break;  /* closing, and nothing queued */
        }
        encoder->head = job->next;
        if (encoder->head == NULL) {
            encoder->tail = NULL;
        }
        job->next = NULL;
        job->state = JOB_RUNNING;
        pthread_mutex_unlock(&encoder->lock);
        batch_encode(&job->batch);
        pthread_mutex_lock(&encoder->lock);
        job->state = JOB_DONE;
        pthread_cond_broadcast(&encoder->done);
    }
    pthread_mutex_unlock(&encoder->lock);
    return NULL;
}

/* Cancel what is queued, wake everyone, join the threads: idempotent. */
static void
encoder_stop(Encoder *encoder)
{
    int started;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&encoder->lock);
    encoder->closing = 1;
    for (Job *job = encoder->head; job != NULL;) {
        Job *next = job->next;
        job->next = NULL;
        job->state = JOB_CANCELLED;
        job = next;
    }
    encoder->head = encoder->tail = NULL;
    pthread_cond_broadcast(&encoder->work);
    pthread_cond_broadcast(&encoder->done);
    started = encoder->threads_started;
    encoder->threads_started = 0;
    pthread_mutex_unlock(&encoder->lock);
    for (int i = 0; i < started; i++) {
        pthread_join(encoder->threads[i], NULL);
    }
    Py_END_ALLOW_THREADS
}

static PyTypeObject JobType;

static int
Encoder_init(Encoder *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"threads", NULL};
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|i:Encoder", keywords, &threads)) {
        return -1;
    }
    if (threads < 1 || threads > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be from 1 to %d", MAX_THREADS);
        return -1;
    }
    self->threads_wanted = threads;
    return 0;
}

static PyObject *
Encoder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Encoder *self = (Encoder *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    pthread_mutex_init(&self->lock, NULL);
    pthread_cond_init(&self->work, NULL);
    pthread_cond_init(&self->done, NULL);
    self->threads_wanted = 1;
    return (PyObject *)self;
}

static void
Encoder_dealloc(Encoder *self)
{
    encoder_stop(self);  /* no job is left: each held a reference */
    pthread_cond_destroy(&self->done);
    pthread_cond_destroy(&self->work);
    pthread_mutex_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Encoder_submit(Encoder *self, PyObject *args)
{
    PyObject *pages;
    Py_ssize_t page_size;
    int compress;
    if (!PyArg_ParseTuple(args, "Onp:submit", &pages, &page_size, &compress)) {
        return NULL;
    }
    Job *job = PyObject_New(Job, &JobType);
    if (job == NULL) {
        return NULL;
    }
    job->encoder = NULL;
    job->next = NULL;
    job->state = JOB_TAKEN;  /* nothing to wait for, should init fail */
    if (batch_init(&job->batch, pages, page_size, compress) < 0) {
        Py_DECREF(job);
        return NULL;
    }
    Py_INCREF(self);
    job->encoder = self;
    pthread_mutex_lock(&self->lock);
    if (self->closing) {
        pthread_mutex_unlock(&self->lock);
        Py_DECREF(job);
        PyErr_SetString(PyExc_RuntimeError, "the encoder is closed");
        return NULL;
    }
    /* Threads start with the first job: an encoder never used runs none. */
    while (self->threads_started < self->threads_wanted) {
        int error = pthread_create(&self->threads[self->threads_started], NULL, encoder_thread, self);
        if (error != 0) {
            if (self->threads_started > 0) {
                break;  /* fewer threads than asked, but some */
            }
            pthread_mutex_unlock(&self->lock);
            Py_DECREF(job);
            errno = error;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        self->threads_started++;
    }
    job->state = JOB_QUEUED;
    if (self->tail == NULL) {
        self->head = job;
    } else {
        self->tail->next = job;
    }
    self->tail = job;
    pthread_cond_signal(&self->work);
    pthread_mutex_unlock(&self->lock);
    return (PyObject *)job;
}

static PyObject *
Encoder_close(Encoder *self, PyObject *unused)
{
    encoder_stop(self);
    Py_RETURN_NONE;
}

static PyMethodDef Encoder_methods[] = {
    {"submit", (PyCFunction)Encoder_submit, METH_VARARGS,
     "submit(pages, page_size, compress) -> Job: encode the pages (held until\n"
     "the job is taken or dropped) on the encoder's threads."},
    {"close", (PyCFunction)Encoder_close, METH_NOARGS,
     "Cancel the jobs still queued and join the threads (idempotent)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tmem_host.store._pagebatch.Encoder",
    .tp_doc = "Encoder(threads=1): native threads that encode batches of pages without the GIL.",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Encoder_new,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
};

/* Wait (GIL released) until the job is no longer queued or running. */
static enum job_state
job_wait(Job *job)
{
    enum job_state state;
    Encoder *encoder = job->encoder;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&encoder->lock);
    while (job->state == JOB_QUEUED || job->state == JOB_RUNNING) {
        pthread_cond_wait(&encoder->done, &encoder->lock);
    }
    state = job->state;
    pthread_mutex_unlock(&encoder->lock);
    Py_END_ALLOW_THREADS
    return state;
}

static PyObject *
Job_forms(Job *self, PyObject *unused)
{
    enum job_state state = job_wait(self);
    if (state == JOB_CANCELLED) {
        batch_free(&self->batch);
        self->state = JOB_TAKEN;
        PyErr_SetString(PyExc_RuntimeError, "the encoder closed before this job ran");
        return NULL;
    }
    if (state == JOB_TAKEN) {
        PyErr_SetString(PyExc_RuntimeError, "the job's forms were taken already");
        return NULL;
    }
    PyObject *forms = batch_forms(&self->batch);
    batch_free(&self->batch);  /* the pages and the scratch go now, not with the job */
    self->state = JOB_TAKEN;
    return forms;
}

/* With the encoder's lock held: take a queued job out of the queue (cancelled). */
static void
unlink_queued(Encoder *encoder, Job *self)
{
    Job *previous = NULL;
    for (Job *job = encoder->head; job != NULL; previous = job, job = job->next) {
        if (job == self) {
            if (previous == NULL) {
                encoder->head = job->next;
            } else {
                previous->next = job->next;
            }
            if (encoder->tail == job) {
                encoder->tail = previous;
            }
            job->next = NULL;
            break;
        }
    }
    self->state = JOB_CANCELLED;
}

static PyObject *
Job_cancel(Job *self, PyObject *unused)
{
    pthread_mutex_lock(&self->encoder->lock);
    int cancelled = self->state == JOB_QUEUED;
    if (cancelled) {
        unlink_queued(self->encoder, self);
    }
    pthread_mutex_unlock(&self->encoder->lock);
    if (cancelled) {
        batch_free(&self->batch);
        self->state = JOB_TAKEN;
    }
    return PyBool_FromLong(cancelled);
}

static PyObject *
Job_done(Job *self, PyObject *unused)
{
    /* The GIL is kept: the lock is only ever held for a few instructions. */
    pthread_mutex_lock(&self->encoder->lock);
    int done = self->state != JOB_QUEUED && self->state != JOB_RUNNING;
    pthread_mutex_unlock(&self->encoder->lock);
    return PyBool_FromLong(done);
}

static void
Job_dealloc(Job *self)
{
    Encoder *encoder = self->encoder;
    if (encoder != NULL) {
        /* Dropped while queued: unlink it; while running: wait for the thread. */
        pthread_mutex_lock(&encoder->lock);
        if (self->state == JOB_QUEUED) {
            unlink_queued(encoder, self);
        }
        int running = self->state == JOB_RUNNING;
        pthread_mutex_unlock(&encoder->lock);
        if (running) {
            job_wait(self);
        }
    }
    batch_free(&self->batch);
    Py_XDECREF(encoder);
    PyObject_Free(self);
}

static PyMethodDef Job_methods[] = {
    {"cancel", (PyCFunction)Job_cancel, METH_NOARGS,
     "cancel() -> bool: take the job out of the queue if no thread has started it\n"
     "(its pages are released; forms() then raises); False if one has."},
    {"done", (PyCFunction)Job_done, METH_NOARGS,
     "done() -> bool: whether forms() would return (or raise) without waiting."},
    {"forms", (PyCFunction)Job_forms, METH_NOARGS,
     "forms() -> list[int | bytes]: wait for the job (GIL released), then its\n"
     "pages' stored forms; RuntimeError if the encoder closed before it ran."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject JobType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tmem_host.store._pagebatch.Job",
    .tp_doc = "A batch submitted to an Encoder.",
    .tp_basicsize = sizeof(Job),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Job_dealloc,
    .tp_methods = Job_methods,
};

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"decode_pages", decode_pages, METH_VARARGS,
     "decode_pages(forms, page_size) -> list[bytes]\n\n"
     "The page of each stored form, as tmem_host.store.pagecodec.decode_page\n"
     "makes it; the lz4 blocks are decompressed with the GIL released."},
    {"encode_pages", encode_pages, METH_VARARGS,
     "encode_pages(pages, page_size, compress) -> list[int | bytes]\n\n"
     "The stored form of every page of `pages` (a contiguous buffer of whole\n"
     "pages), as tmem_host.store.pagecodec.encode_page makes it; the GIL is\n"
     "released while the pages are examined and compressed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tmem_host.store._pagebatch",
    "Batches of pages to their stored forms without the GIL (docs/PERFORMANCE.md).", -1, methods,
};

PyMODINIT_FUNC
PyInit__pagebatch(void)
{
    if (PyType_Ready(&EncoderType) < 0 || PyType_Ready(&JobType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Encoder", (PyObject *)&EncoderType) < 0
            || PyModule_AddObjectRef(m, "Job", (PyObject *)&JobType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
