/*
 * A fake libnvidia-ml.so.1 for tests on machines without an NVIDIA GPU.
 *
 * Compiled against the official nvml.h (pip package nvidia-nvml-dev), so every exported
 * signature, struct, constant and return code is checked by the compiler. pynvml loads it with
 * CDLL("libnvidia-ml.so.1") when its directory is first on LD_LIBRARY_PATH; the real pynvml
 * ctypes code then runs against it. Build and scenario helpers: tests/nvml_fake.py.
 *
 * The scenario is a small text file named by $FAKE_NVML_CONFIG. It is read at nvmlInit and
 * again on every query (a test may rewrite it, atomically via rename, while a process runs):
 *
 *     # comment
 *     init = ok                  # | driver_not_loaded | no_permission | unknown_error
 *     driver_version = 550.54.15
 *     cuda_version = 12040
 *     gpu name="NVIDIA GeForce RTX 4090" uuid=GPU-... total=25757220864 used=1073741824
 *         cc=8.9 mig=0 bus=00000000:01:00.0 power_limit_mw=450000 power_mw=60000 temp=45
 *         util_gpu=3 util_mem=1 throttle=0x0 ecc_uncorrected=0
 *         processes=1234:104857600,5678:na lost=0                         (all on one line)
 *
 * processes lists the GPU's compute processes as PID:USED_GPU_MEMORY_BYTES, comma-separated
 * (at most 64; `na` bytes reads as NVML_VALUE_NOT_AVAILABLE, which pynvml turns into None);
 * `none` means no process runs. nvmlDeviceGetComputeRunningProcesses_v3 and _v2 follow NVML's
 * two-call protocol: *infoCount smaller than the number of processes (0 with infos NULL is
 * allowed) sets *infoCount to that number and returns NVML_ERROR_INSUFFICIENT_SIZE; otherwise
 * the entries are filled (gpuInstanceId and computeInstanceId 0xFFFFFFFF) and *infoCount set.
 * (The unversioned v1-struct nvmlDeviceGetComputeRunningProcesses is not exported: pynvml
 * never looks it up; its unversioned wrapper calls _v3.)
 * One gpu line per device, in index order. A field whose value is `na`, or that is left out,
 * makes its query return NVML_ERROR_NOT_SUPPORTED. lost=1 makes nvmlDeviceGetHandleByIndex_v2
 * and every query on that device (also through a handle taken earlier) return
 * NVML_ERROR_GPU_IS_LOST. Numbers are decimal or 0x hex; values may be double-quoted (then
 * they may hold spaces and '#'). Any malformed line, unknown key or unreadable file fails the
 * whole read: nvmlInit returns NVML_ERROR_UNKNOWN, a query returns NVML_ERROR_UNKNOWN (the
 * last good scenario is kept). Nothing is ever printed to stdout; with $FAKE_NVML_DEBUG set,
 * the reason a read failed goes to stderr.
 *
 * Every exported function sits in #ifndef OMIT_<name> so a test can build a library that lacks
 * it (pynvml then raises NVMLError_FunctionNotFound). Everything else is static.
 */
#ifndef NVML_NO_UNVERSIONED_FUNC_DEFS
#define NVML_NO_UNVERSIONED_FUNC_DEFS /* declare nvmlInit too, so its signature is checked */
#endif
#include <nvml.h>

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HELPER static __attribute__((unused)) /* unused when its callers are omitted */

#define MAX_GPUS 64
#define MAX_FILE_BYTES 65536
#define MAX_TOKEN 2048 /* a processes list can be long */
#define MAX_PROCS 64

/* Bits of struct nvmlDevice_st.has: a field was given and is not `na`. */
enum {
    F_NAME = 1u << 0,
    F_UUID = 1u << 1,
    F_TOTAL = 1u << 2,
    F_USED = 1u << 3,
    F_CC = 1u << 4,
    F_MIG = 1u << 5,
    F_BUS = 1u << 6,
    F_POWER_LIMIT = 1u << 7,
    F_POWER = 1u << 8,
    F_TEMP = 1u << 9,
    F_UTIL_GPU = 1u << 10,
    F_UTIL_MEM = 1u << 11,
    F_THROTTLE = 1u << 12,
    F_ECC = 1u << 13,
    F_LOST = 1u << 14, /* lost cannot be na */
    F_PROCS = 1u << 15
};

/* One compute process: its PID and the GPU memory it uses (ULLONG_MAX: not available). */
struct fake_proc {
    unsigned int pid;
    unsigned long long used;
};

/* Completes nvml.h's opaque `typedef struct nvmlDevice_st *nvmlDevice_t`. */
struct nvmlDevice_st {
    unsigned int has;
    int lost;
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
    char uuid[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    unsigned int domain, bus, device; /* PCI location, from bus=DOMAIN:BUS:DEVICE.0 */
    unsigned long long total, used, throttle, ecc;
    int cc_major, cc_minor;
    unsigned int mig, power_limit, power, temp, util_gpu, util_mem;
    unsigned int nprocs;
    struct fake_proc procs[MAX_PROCS];
};

typedef struct {
    nvmlReturn_t init;
    int has_driver_version, has_cuda_version;
    char driver_version[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE];
    int cuda_version;
    unsigned int count;
    struct nvmlDevice_st gpus[MAX_GPUS];
} scenario_t;

/* All state below is guarded by g_lock. Handles point into g_scn.gpus. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static scenario_t g_scn;
static scenario_t g_next;
static char g_text[MAX_FILE_BYTES + 1];
static unsigned int g_refcount;

/* ------------------------------------------------------------------ reading the scenario */

typedef enum { T_STR, T_U32, T_U64, T_BOOL, T_CC, T_BUS, T_PROCS } field_type_t;

typedef struct {
    const char *key;
    field_type_t type;
    size_t offset;
    size_t size; /* T_STR: buffer size */
    unsigned int bit;
} field_t;

#define FIELD(key, type, member, bit) \
    {key, type, offsetof(struct nvmlDevice_st, member), sizeof(((struct nvmlDevice_st *)0)->member), bit}

static const field_t FIELDS[] = {
    FIELD("name", T_STR, name, F_NAME),
    FIELD("uuid", T_STR, uuid, F_UUID),
    FIELD("total", T_U64, total, F_TOTAL),
    FIELD("used", T_U64, used, F_USED),
    FIELD("cc", T_CC, cc_major, F_CC),
    FIELD("mig", T_BOOL, mig, F_MIG),
    FIELD("bus", T_BUS, domain, F_BUS),
    FIELD("power_limit_mw", T_U32, power_limit, F_POWER_LIMIT),
    FIELD("power_mw", T_U32, power, F_POWER),
    FIELD("temp", T_U32, temp, F_TEMP),
    FIELD("util_gpu", T_U32, util_gpu, F_UTIL_GPU),
    FIELD("util_mem", T_U32, util_mem, F_UTIL_MEM),
    FIELD("throttle", T_U64, throttle, F_THROTTLE),
    FIELD("ecc_uncorrected", T_U64, ecc, F_ECC),
    FIELD("processes", T_PROCS, nprocs, F_PROCS),
    FIELD("lost", T_BOOL, lost, F_LOST),
};

static int fail(int line, const char *why, const char *what)
{
    const char *path = getenv("FAKE_NVML_CONFIG");
    if (getenv("FAKE_NVML_DEBUG") != NULL) {
        fprintf(stderr, "fake_nvml: %s line %d: %s%s%s\n", path ? path : "(unset)", line, why,
                what ? ": " : "", what ? what : "");
    }
    return -1;
}

/* Decimal or 0x hex, no sign, whole string, <= max. */
static int parse_uint(const char *s, unsigned long long max, unsigned long long *out)
{
    int base = 10;
    char *end = NULL;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    if (!isxdigit((unsigned char)s[0]) || (base == 10 && !isdigit((unsigned char)s[0])))
        return -1;
    errno = 0;
    *out = strtoull(s, &end, base);
    return (errno != 0 || *end != '\0' || *out > max) ? -1 : 0;
}

/* `none`, or PID:BYTES[,PID:BYTES...] with BYTES a number or `na`. */
static int parse_procs(const char *v, struct nvmlDevice_st *d)
{
    char item[MAX_TOKEN];
    d->nprocs = 0;
    if (strcmp(v, "none") == 0)
        return 0;
    for (;;) {
        const char *comma = strchr(v, ',');
        size_t n = comma != NULL ? (size_t)(comma - v) : strlen(v);
        char *colon;
        unsigned long long pid = 0, used = 0;
        if (d->nprocs >= MAX_PROCS || n == 0 || n >= sizeof item)
            return -1;
        memcpy(item, v, n);
        item[n] = '\0';
        colon = strchr(item, ':');
        if (colon == NULL)
            return -1;
        *colon = '\0';
        if (parse_uint(item, UINT_MAX, &pid) != 0)
            return -1;
        if (strcmp(colon + 1, "na") == 0)
            used = ULLONG_MAX; /* NVML_VALUE_NOT_AVAILABLE as unsigned long long */
        else if (parse_uint(colon + 1, ULLONG_MAX, &used) != 0)
            return -1;
        d->procs[d->nprocs].pid = (unsigned int)pid;
        d->procs[d->nprocs].used = used;
        d->nprocs++;
        if (comma == NULL)
            return 0;
        v = comma + 1;
    }
}

static int parse_value(const field_t *f, const char *v, struct nvmlDevice_st *d)
{
    char *at = (char *)d + f->offset;
    unsigned long long n = 0, m = 0;
    unsigned int domain = 0, bus = 0, device = 0, function = 0;
    char tail = 0;
    switch (f->type) {
    case T_STR:
        if (strlen(v) >= f->size)
            return -1;
        memcpy(at, v, strlen(v) + 1);
        return 0;
    case T_U32:
        if (parse_uint(v, UINT_MAX, &n) != 0)
            return -1;
        *(unsigned int *)(void *)at = (unsigned int)n;
        return 0;
    case T_U64:
        return parse_uint(v, ULLONG_MAX, (unsigned long long *)(void *)at);
    case T_BOOL:
        if (parse_uint(v, 1, &n) != 0)
            return -1;
        if (f->bit == F_LOST)
            d->lost = (int)n;
        else
            *(unsigned int *)(void *)at = (unsigned int)n;
        return 0;
    case T_CC: {
        char major[16];
        const char *dot = strchr(v, '.');
        if (dot == NULL || (size_t)(dot - v) >= sizeof major)
            return -1;
        memcpy(major, v, (size_t)(dot - v));
        major[dot - v] = '\0';
        if (parse_uint(major, 99, &n) != 0 || parse_uint(dot + 1, 99, &m) != 0)
            return -1;
        d->cc_major = (int)n;
        d->cc_minor = (int)m;
        return 0;
    }
    case T_BUS:
        if (sscanf(v, "%x:%x:%x.%x%c", &domain, &bus, &device, &function, &tail) != 4 ||
            bus > 0xff || device > 0x1f || function != 0 || strchr(v, '-') != NULL)
            return -1;
        d->domain = domain;
        d->bus = bus;
        d->device = device;
        return 0;
    case T_PROCS:
        return parse_procs(v, d);
    }
    return -1;
}

/* Reads `key [= value]` at *p; value bare (to whitespace or '#') or double-quoted (*quoted is
 * then set: a quoted "na" is a string, not `na`). Returns 1, 0 at end of line, -1 on error. */
static int next_token(char **p, char *key, char *value, int *has_value, int *quoted)
{
    char *s = *p;
    size_t n = 0;
    while (*s == ' ' || *s == '\t' || *s == '\r')
        s++;
    if (*s == '\0' || *s == '#') {
        *p = s;
        return 0; /* end of line */
    }
    while (isalnum((unsigned char)*s) || *s == '_') {
        if (n + 1 >= MAX_TOKEN)
            return -1;
        key[n++] = *s++;
    }
    key[n] = '\0';
    if (n == 0)
        return -1;
    while (*s == ' ' || *s == '\t')
        s++;
    *has_value = (*s == '=');
    *quoted = 0;
    value[0] = '\0';
    if (*has_value) {
        s++;
        while (*s == ' ' || *s == '\t')
            s++;
        n = 0;
        if (*s == '"') {
            *quoted = 1;
            for (s++; *s != '"'; s++) {
                if (*s == '\0' || n + 1 >= MAX_TOKEN)
                    return -1;
                value[n++] = *s;
            }
            s++;
        } else {
            while (*s != '\0' && *s != ' ' && *s != '\t' && *s != '\r' && *s != '#') {
                if (n + 1 >= MAX_TOKEN)
                    return -1;
                value[n++] = *s++;
            }
            if (n == 0)
                return -1;
        }
        value[n] = '\0';
    }
    *p = s;
    return 1;
}

static int parse_gpu(char *rest, int line, scenario_t *scn)
{
    char key[MAX_TOKEN], value[MAX_TOKEN];
    int has_value = 0, quoted = 0, got;
    unsigned int seen = 0;
    struct nvmlDevice_st *d;
    if (scn->count >= MAX_GPUS)
        return fail(line, "too many gpu lines", NULL);
    d = &scn->gpus[scn->count++];
    while ((got = next_token(&rest, key, value, &has_value, &quoted)) == 1) {
        size_t i;
        const field_t *f = NULL;
        for (i = 0; i < sizeof FIELDS / sizeof FIELDS[0]; i++)
            if (strcmp(FIELDS[i].key, key) == 0)
                f = &FIELDS[i];
        if (f == NULL || !has_value)
            return fail(line, "unknown gpu field or missing value", key);
        if (seen & f->bit)
            return fail(line, "field given twice", key);
        seen |= f->bit;
        if (!quoted && strcmp(value, "na") == 0 && f->bit != F_LOST)
            continue; /* stays unsupported */
        if (parse_value(f, value, d) != 0)
            return fail(line, "bad value", key);
        d->has |= f->bit;
    }
    if (got < 0)
        return fail(line, "bad token", NULL);
    if ((d->has & F_TOTAL) && (d->has & F_USED) && d->used > d->total)
        return fail(line, "used > total", NULL);
    return 0;
}

static nvmlReturn_t init_result(const char *v)
{
    if (strcmp(v, "ok") == 0)
        return NVML_SUCCESS;
    if (strcmp(v, "driver_not_loaded") == 0)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    if (strcmp(v, "no_permission") == 0)
        return NVML_ERROR_NO_PERMISSION;
    if (strcmp(v, "unknown_error") == 0)
        return NVML_ERROR_UNKNOWN;
    return NVML_ERROR_INVALID_ARGUMENT; /* marks a bad value */
}

static int parse_system(const char *key, const char *value, int quoted, int line,
                        scenario_t *scn)
{
    unsigned long long n = 0;
    int na = !quoted && strcmp(value, "na") == 0;
    if (strcmp(key, "init") == 0) {
        scn->init = init_result(value);
        return scn->init == NVML_ERROR_INVALID_ARGUMENT ? fail(line, "bad init", value) : 0;
    }
    if (strcmp(key, "driver_version") == 0) {
        if (strlen(value) >= sizeof scn->driver_version)
            return fail(line, "driver_version too long", NULL);
        memcpy(scn->driver_version, value, strlen(value) + 1);
        scn->has_driver_version = !na;
        return 0;
    }
    if (strcmp(key, "cuda_version") == 0) {
        if (!na && parse_uint(value, INT_MAX, &n) != 0)
            return fail(line, "bad cuda_version", value);
        scn->cuda_version = (int)n;
        scn->has_cuda_version = !na;
        return 0;
    }
    return fail(line, "unknown key", key);
}

static int parse_line(char *text, int line, scenario_t *scn)
{
    char key[MAX_TOKEN], value[MAX_TOKEN];
    int has_value = 0, quoted = 0;
    int got = next_token(&text, key, value, &has_value, &quoted);
    if (got <= 0)
        return got < 0 ? fail(line, "bad token", NULL) : 0;
    if (strcmp(key, "gpu") == 0 && !has_value)
        return parse_gpu(text, line, scn);
    if (!has_value)
        return fail(line, "expected key = value", key);
    if (parse_system(key, value, quoted, line, scn) != 0)
        return -1;
    got = next_token(&text, key, value, &has_value, &quoted);
    return got == 0 ? 0 : fail(line, "trailing text", NULL);
}

static int parse_text(char *text, scenario_t *scn)
{
    char *line = text;
    int number = 1;
    memset(scn, 0, sizeof *scn);
    scn->init = NVML_SUCCESS;
    while (line != NULL) {
        char *nl = strchr(line, '\n');
        if (nl != NULL)
            *nl = '\0';
        if (parse_line(line, number, scn) != 0)
            return -1;
        line = nl != NULL ? nl + 1 : NULL;
        number++;
    }
    return 0;
}

/* Re-reads $FAKE_NVML_CONFIG into g_scn. Caller holds g_lock. 0 on success. */
static int reload(void)
{
    const char *path = getenv("FAKE_NVML_CONFIG");
    FILE *file;
    size_t n;
    if (path == NULL || path[0] == '\0')
        return fail(0, "FAKE_NVML_CONFIG is not set", NULL);
    file = fopen(path, "r");
    if (file == NULL)
        return fail(0, "cannot open", strerror(errno));
    n = fread(g_text, 1, MAX_FILE_BYTES + 1, file);
    if (ferror(file) || n > MAX_FILE_BYTES) {
        fclose(file);
        return fail(0, "cannot read, or larger than 64 KiB", NULL);
    }
    fclose(file);
    g_text[n] = '\0';
    if (memchr(g_text, '\0', n) != NULL)
        return fail(0, "NUL byte in file", NULL);
    if (parse_text(g_text, &g_next) != 0)
        return -1;
    memcpy(&g_scn, &g_next, sizeof g_scn);
    return 0;
}

/* ------------------------------------------------------------------ common call paths */

/* Locks; checks init, reloads, checks args. Pair with end(). */
HELPER nvmlReturn_t begin(int args_ok)
{
    pthread_mutex_lock(&g_lock);
    if (g_refcount == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (reload() != 0)
        return NVML_ERROR_UNKNOWN;
    return args_ok ? NVML_SUCCESS : NVML_ERROR_INVALID_ARGUMENT;
}

HELPER nvmlReturn_t end(nvmlReturn_t result)
{
    pthread_mutex_unlock(&g_lock);
    return result;
}

/* begin() for a device query: valid handle, not lost, every field in `need` supported. */
HELPER nvmlReturn_t begin_device(nvmlDevice_t device, int args_ok, unsigned int need,
                                 const struct nvmlDevice_st **out)
{
    nvmlReturn_t r = begin(args_ok);
    uintptr_t at = (uintptr_t)device, base = (uintptr_t)g_scn.gpus;
    if (r != NVML_SUCCESS)
        return r;
    if (at < base || (at - base) % sizeof g_scn.gpus[0] != 0 ||
        (at - base) / sizeof g_scn.gpus[0] >= g_scn.count)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->lost)
        return NVML_ERROR_GPU_IS_LOST;
    if ((device->has & need) != need)
        return NVML_ERROR_NOT_SUPPORTED;
    *out = device;
    return NVML_SUCCESS;
}

HELPER nvmlReturn_t copy_string(const char *value, char *buffer, unsigned int length)
{
    if (strlen(value) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buffer, value, strlen(value) + 1);
    return NVML_SUCCESS;
}

HELPER nvmlReturn_t do_init(void)
{
    nvmlReturn_t r = NVML_SUCCESS;
    pthread_mutex_lock(&g_lock);
    if (reload() != 0)
        r = NVML_ERROR_UNKNOWN;
    else if (g_scn.init != NVML_SUCCESS)
        r = g_scn.init;
    else
        g_refcount++;
    return end(r);
}

HELPER nvmlReturn_t cuda_version(int *version)
{
    nvmlReturn_t r = begin(version != NULL);
    if (r == NVML_SUCCESS && !g_scn.has_cuda_version)
        r = NVML_ERROR_NOT_SUPPORTED;
    if (r == NVML_SUCCESS)
        *version = g_scn.cuda_version;
    return end(r);
}

HELPER nvmlReturn_t power_limit(nvmlDevice_t device, unsigned int *limit)
{
    const struct nvmlDevice_st *d = NULL;
    nvmlReturn_t r = begin_device(device, limit != NULL, F_POWER_LIMIT, &d);
    if (r == NVML_SUCCESS)
        *limit = d->power_limit;
    return end(r);
}

HELPER nvmlReturn_t clock_reasons(nvmlDevice_t device, unsigned long long *reasons)
{
    const struct nvmlDevice_st *d = NULL;
    nvmlReturn_t r = begin_device(device, reasons != NULL, F_THROTTLE, &d);
    if (r == NVML_SUCCESS)
        *reasons = d->throttle;
    return end(r);
}

/* The two-call protocol of nvmlDeviceGetComputeRunningProcesses_v2/_v3 (same struct). */
HELPER nvmlReturn_t running_processes(nvmlDevice_t device, unsigned int *infoCount,
                                      nvmlProcessInfo_t *infos)
{
    const struct nvmlDevice_st *d = NULL;
    int args_ok = infoCount != NULL && (infos != NULL || *infoCount == 0);
    nvmlReturn_t r = begin_device(device, args_ok, F_PROCS, &d);
    unsigned int i;
    if (r == NVML_SUCCESS && *infoCount < d->nprocs) {
        *infoCount = d->nprocs;
        r = NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (r == NVML_SUCCESS) {
        for (i = 0; i < d->nprocs; i++) {
            infos[i].pid = d->procs[i].pid;
            infos[i].usedGpuMemory = d->procs[i].used;
            infos[i].gpuInstanceId = 0xFFFFFFFFu; /* no MIG instance */
            infos[i].computeInstanceId = 0xFFFFFFFFu;
        }
        *infoCount = d->nprocs;
    }
    return end(r);
}

/* ------------------------------------------------------------------ init and system */

#ifndef OMIT_nvmlInitWithFlags
nvmlReturn_t DECLDIR nvmlInitWithFlags(unsigned int flags)
{
    (void)flags; /* NO_GPUS / NO_ATTACH / FORCE_INIT change nothing here */
    return do_init();
}
#endif

#ifndef OMIT_nvmlInit_v2
nvmlReturn_t DECLDIR nvmlInit_v2(void)
{
    return do_init();
}
#endif

#ifndef OMIT_nvmlInit
nvmlReturn_t DECLDIR nvmlInit(void)
{
    return do_init();
}
#endif

#ifndef OMIT_nvmlShutdown
nvmlReturn_t DECLDIR nvmlShutdown(void)
{
    nvmlReturn_t r = NVML_SUCCESS;
    pthread_mutex_lock(&g_lock);
    if (g_refcount == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else
        g_refcount--;
    return end(r);
}
#endif

#ifndef OMIT_nvmlErrorString
const DECLDIR char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    case NVML_ERROR_UNKNOWN: return "Unknown Error";
    default: return "Unknown Error";
    }
}
#endif

#ifndef OMIT_nvmlSystemGetDriverVersion
nvmlReturn_t DECLDIR nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    nvmlReturn_t r = begin(version != NULL);
    if (r == NVML_SUCCESS && !g_scn.has_driver_version)
        r = NVML_ERROR_NOT_SUPPORTED;
    if (r == NVML_SUCCESS)
        r = copy_string(g_scn.driver_version, version, length);
    return end(r);
}
#endif

#ifndef OMIT_nvmlSystemGetCudaDriverVersion
nvmlReturn_t DECLDIR nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion)
{
    return cuda_version(cudaDriverVersion);
}
#endif

#ifndef OMIT_nvmlSystemGetCudaDriverVersion_v2
nvmlReturn_t DECLDIR nvmlSystemGetCudaDriverVersion_v2(int *cudaDriverVersion)
{
    return cuda_version(cudaDriverVersion);
}
#endif

/* ------------------------------------------------------------------ devices */

#ifndef OMIT_nvmlDeviceGetCount_v2
nvmlReturn_t DECLDIR nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    nvmlReturn_t r = begin(deviceCount != NULL);
    if (r == NVML_SUCCESS)
        *deviceCount = g_scn.count;
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetHandleByIndex_v2
nvmlReturn_t DECLDIR nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t r = begin(device != NULL);
    if (r == NVML_SUCCESS && index >= g_scn.count)
        r = NVML_ERROR_INVALID_ARGUMENT;
    if (r == NVML_SUCCESS && g_scn.gpus[index].lost)
        r = NVML_ERROR_GPU_IS_LOST;
    if (r == NVML_SUCCESS)
        *device = &g_scn.gpus[index];
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetIndex
nvmlReturn_t DECLDIR nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    const struct nvmlDevice_st *d = NULL;
    nvmlReturn_t r = begin_device(device, index != NULL, 0, &d);
    if (r == NVML_SUCCESS)
        *index = (unsigned int)(d - g_scn.gpus);
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetName
nvmlReturn_t DECLDIR nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    const struct nvmlDevice_st *d = NULL;
    nvmlReturn_t r = begin_device(device, name != NULL, F_NAME, &d);
    if (r == NVML_SUCCESS)
        r = copy_string(d->name, name, length);
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetUUID
nvmlReturn_t DECLDIR nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    const struct nvmlDevice_st *d = NULL;
    nvmlReturn_t r = begin_device(device, uuid != NULL, F_UUID, &d);
    if (r == NVML_SUCCESS)
        r = copy_string(d->uuid, uuid, length);
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetMemoryInfo
nvmlReturn_t DECLDIR nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    const struct nvmlDevice_st *d = NULL;
    nvmlReturn_t r = begin_device(device, memory != NULL, F_TOTAL | F_USED, &d);
    if (r == NVML_SUCCESS) {
        memory->total = d->total;
        memory->used = d->used;
        memory->free = d->total - d->used;
    }
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetMemoryInfo_v2
nvmlReturn_t DECLDIR nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    const struct nvmlDevice_st *d = NULL;
    nvmlReturn_t r = begin_device(device, memory != NULL, F_TOTAL | F_USED, &d);
    if (r == NVML_SUCCESS && memory->version != nvmlMemory_v2)
        r = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (r == NVML_SUCCESS) {
        memory->total = d->total;
        memory->reserved = 0;
        memory->used = d->used;
        memory->free = d->total - d->used;
    }
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetCudaComputeCapability
nvmlReturn_t DECLDIR nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor)
{
    const struct nvmlDevice_st *d = NULL;
    nvmlReturn_t r = begin_device(device, major != NULL && minor != NULL, F_CC, &d);
    if (r == NVML_SUCCESS) {
        *major = d->cc_major;
        *minor = d->cc_minor;
    }
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetMigMode
nvmlReturn_t DECLDIR nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode,
                                          unsigned int *pendingMode)
{
    const struct nvmlDevice_st *d = NULL;
    nvmlReturn_t r = begin_device(device, currentMode != NULL && pendingMode != NULL, F_MIG, &d);
    if (r == NVML_SUCCESS) {
        *currentMode = d->mig ? NVML_DEVICE_MIG_ENABLE : NVML_DEVICE_MIG_DISABLE;
        *pendingMode = *currentMode;
    }
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetPciInfo_v3
nvmlReturn_t DECLDIR nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    const struct nvmlDevice_st *d = NULL;
    nvmlReturn_t r = begin_device(device, pci != NULL, F_BUS, &d);
    if (r == NVML_SUCCESS) {
        memset(pci, 0, sizeof *pci);
        pci->domain = d->domain;
        pci->bus = d->bus & 0xffu;
        pci->device = d->device & 0x1fu;
        snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, NVML_DEVICE_PCI_BUS_ID_LEGACY_FMT,
                 d->domain & 0xffffu, d->bus & 0xffu, d->device & 0x1fu);
        snprintf(pci->busId, sizeof pci->busId, NVML_DEVICE_PCI_BUS_ID_FMT, d->domain,
                 d->bus & 0xffu, d->device & 0x1fu);
    }
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetEnforcedPowerLimit
nvmlReturn_t DECLDIR nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    return power_limit(device, limit);
}
#endif

#ifndef OMIT_nvmlDeviceGetPowerManagementLimit
nvmlReturn_t DECLDIR nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit)
{
    return power_limit(device, limit);
}
#endif

#ifndef OMIT_nvmlDeviceGetUtilizationRates
nvmlReturn_t DECLDIR nvmlDeviceGetUtilizationRates(nvmlDevice_t device,
                                                   nvmlUtilization_t *utilization)
{
    const struct nvmlDevice_st *d = NULL;
    nvmlReturn_t r = begin_device(device, utilization != NULL, F_UTIL_GPU | F_UTIL_MEM, &d);
    if (r == NVML_SUCCESS) {
        utilization->gpu = d->util_gpu;
        utilization->memory = d->util_mem;
    }
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetTemperature
nvmlReturn_t DECLDIR nvmlDeviceGetTemperature(nvmlDevice_t device,
                                              nvmlTemperatureSensors_t sensorType,
                                              unsigned int *temp)
{
    const struct nvmlDevice_st *d = NULL;
    int known = (unsigned int)sensorType < (unsigned int)NVML_TEMPERATURE_COUNT;
    nvmlReturn_t r = begin_device(device, temp != NULL && known, F_TEMP, &d);
    if (r == NVML_SUCCESS && sensorType != NVML_TEMPERATURE_GPU)
        r = NVML_ERROR_NOT_SUPPORTED; /* only the die sensor is faked */
    if (r == NVML_SUCCESS)
        *temp = d->temp;
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetPowerUsage
nvmlReturn_t DECLDIR nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    const struct nvmlDevice_st *d = NULL;
    nvmlReturn_t r = begin_device(device, power != NULL, F_POWER, &d);
    if (r == NVML_SUCCESS)
        *power = d->power;
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetCurrentClocksEventReasons
nvmlReturn_t DECLDIR nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device,
                                                            unsigned long long *clocksEventReasons)
{
    return clock_reasons(device, clocksEventReasons);
}
#endif

#ifndef OMIT_nvmlDeviceGetCurrentClocksThrottleReasons
nvmlReturn_t DECLDIR nvmlDeviceGetCurrentClocksThrottleReasons(
    nvmlDevice_t device, unsigned long long *clocksThrottleReasons)
{
    return clock_reasons(device, clocksThrottleReasons);
}
#endif

#ifndef OMIT_nvmlDeviceGetTotalEccErrors
nvmlReturn_t DECLDIR nvmlDeviceGetTotalEccErrors(nvmlDevice_t device,
                                                 nvmlMemoryErrorType_t errorType,
                                                 nvmlEccCounterType_t counterType,
                                                 unsigned long long *eccCounts)
{
    const struct nvmlDevice_st *d = NULL;
    int known = (errorType == NVML_MEMORY_ERROR_TYPE_CORRECTED ||
                 errorType == NVML_MEMORY_ERROR_TYPE_UNCORRECTED) &&
                (counterType == NVML_VOLATILE_ECC || counterType == NVML_AGGREGATE_ECC);
    nvmlReturn_t r = begin_device(device, eccCounts != NULL && known, F_ECC, &d);
    if (r == NVML_SUCCESS) /* volatile and aggregate counters read the same */
        *eccCounts = errorType == NVML_MEMORY_ERROR_TYPE_UNCORRECTED ? d->ecc : 0;
    return end(r);
}
#endif

#ifndef OMIT_nvmlDeviceGetComputeRunningProcesses_v3
nvmlReturn_t DECLDIR nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
                                                             unsigned int *infoCount,
                                                             nvmlProcessInfo_t *infos)
{
    return running_processes(device, infoCount, infos);
}
#endif

#ifndef OMIT_nvmlDeviceGetComputeRunningProcesses_v2
nvmlReturn_t DECLDIR nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device,
                                                             unsigned int *infoCount,
                                                             nvmlProcessInfo_v2_t *infos)
{
    return running_processes(device, infoCount, infos);
}
#endif
