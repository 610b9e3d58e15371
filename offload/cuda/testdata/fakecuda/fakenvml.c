/*
 * fakenvml.c: a fake libnvidia-ml.so.1 over the same fake GPUs as
 * fakecuda.c (see fakegpu.h). Build:
 *
 *   gcc -shared -fPIC -O2 -o libnvidia-ml.so.1 fakenvml.c
 *
 * It implements the part of NVML that cryo calls: driver and CUDA
 * versions, devices (index, UUID, name, memory, persistence mode), the
 * compute processes on each device with the device memory they hold, and
 * Xid events read from $FAKECUDA_ROOT/xid ("UUID XID" lines). Memory in use
 * is what the live contexts of fakecuda hold; a checkpointed process holds
 * none and is not listed, as with the real driver. Processes are listed by
 * their PIDs as the caller sees them (a job in a PID namespace of its own
 * by its PIDs on the node); one the caller cannot see (outside its own PID
 * namespace) is not listed, though its memory counts as used.
 */
#include "fakegpu.h"

typedef int nvmlReturn_t;
typedef struct fn_device {
	int index;
} *nvmlDevice_t;
typedef struct fn_set {
	unsigned long long types[FG_MAX_GPUS];
	long offset; /* how far into the xid file this set has read */
} *nvmlEventSet_t;

typedef struct {
	unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
	unsigned int pid;
	unsigned long long usedGpuMemory;
	unsigned int gpuInstanceId;
	unsigned int computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
	nvmlDevice_t device;
	unsigned long long eventType;
	unsigned long long eventData;
	unsigned int gpuInstanceId;
	unsigned int computeInstanceId;
} nvmlEventData_t;

enum {
	NVML_SUCCESS = 0,
	NVML_ERROR_UNINITIALIZED = 1,
	NVML_ERROR_INVALID_ARGUMENT = 2,
	NVML_ERROR_NOT_SUPPORTED = 3,
	NVML_ERROR_INSUFFICIENT_SIZE = 7,
	NVML_ERROR_DRIVER_NOT_LOADED = 9,
	NVML_ERROR_TIMEOUT = 10,
	NVML_ERROR_NOT_FOUND = 6,
	NVML_ERROR_UNKNOWN = 999,
};

#define XID_EVENT 8ULL
#define EXPORT __attribute__((visibility("default")))

static struct fg_world W;
static int inited;
static struct fn_device devs[FG_MAX_GPUS];

static int valid(nvmlDevice_t d) { return inited && d != NULL && d >= devs && d < devs + W.n; }

EXPORT nvmlReturn_t nvmlInit_v2(void)
{
	if (fg_load(&W) != 0)
		return NVML_ERROR_DRIVER_NOT_LOADED;
	for (int i = 0; i < FG_MAX_GPUS; i++)
		devs[i].index = i;
	inited = 1;
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInit_v2(); }

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
	(void)flags;
	return nvmlInit_v2();
}

EXPORT nvmlReturn_t nvmlShutdown(void)
{
	if (!inited)
		return NVML_ERROR_UNINITIALIZED;
	inited = 0;
	return NVML_SUCCESS;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t r)
{
	switch (r) {
	case NVML_SUCCESS: return "Success";
	case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
	case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
	case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
	case NVML_ERROR_NOT_FOUND: return "Not Found";
	case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
	case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
	case NVML_ERROR_TIMEOUT: return "Timeout";
	default: return "Unknown Error";
	}
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *v, unsigned int len)
{
	if (!inited)
		return NVML_ERROR_UNINITIALIZED;
	if (v == NULL || len < strlen(W.driver_version) + 1)
		return NVML_ERROR_INSUFFICIENT_SIZE;
	snprintf(v, len, "%s", W.driver_version);
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v)
{
	if (!inited)
		return NVML_ERROR_UNINITIALIZED;
	if (v == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	*v = W.cuda_version;
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) { return nvmlSystemGetCudaDriverVersion(v); }

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n)
{
	if (!inited)
		return NVML_ERROR_UNINITIALIZED;
	if (n == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	*n = (unsigned int)W.n;
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *n) { return nvmlDeviceGetCount_v2(n); }

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d)
{
	if (!inited)
		return NVML_ERROR_UNINITIALIZED;
	if (d == NULL || i >= (unsigned int)W.n)
		return NVML_ERROR_INVALID_ARGUMENT;
	*d = &devs[i];
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int i, nvmlDevice_t *d) { return nvmlDeviceGetHandleByIndex_v2(i, d); }

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *d)
{
	if (!inited)
		return NVML_ERROR_UNINITIALIZED;
	if (uuid == NULL || d == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	int i = fg_find_uuid(&W, uuid);
	if (i < 0)
		return NVML_ERROR_NOT_FOUND;
	*d = &devs[i];
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned int *i)
{
	if (!valid(d) || i == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	*i = (unsigned int)d->index;
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t d, unsigned int *m) { return nvmlDeviceGetIndex(d, m); }

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int len)
{
	if (!valid(d) || uuid == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	if (len < strlen(W.g[d->index].uuid) + 1)
		return NVML_ERROR_INSUFFICIENT_SIZE;
	snprintf(uuid, len, "%s", W.g[d->index].uuid);
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int len)
{
	if (!valid(d) || name == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	if (len < strlen(W.g[d->index].model) + 1)
		return NVML_ERROR_INSUFFICIENT_SIZE;
	snprintf(name, len, "%s", W.g[d->index].model);
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m)
{
	if (!valid(d) || m == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	m->total = W.g[d->index].total;
	m->used = fg_scan(&W, d->index, NULL, NULL);
	m->free = m->used < m->total ? m->total - m->used : 0;
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPersistenceMode(nvmlDevice_t d, int *mode)
{
	if (!valid(d) || mode == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	*mode = 1; /* NVML_FEATURE_ENABLED */
	return NVML_SUCCESS;
}

struct proc_list {
	nvmlProcessInfo_t p[256];
	unsigned int n;
};

static void add_proc(void *arg, int pid, unsigned long long bytes)
{
	struct proc_list *l = arg;
	for (unsigned int i = 0; i < l->n; i++)
		if (l->p[i].pid == (unsigned int)pid) {
			l->p[i].usedGpuMemory += bytes;
			return;
		}
	if (l->n < 256)
		l->p[l->n++] = (nvmlProcessInfo_t){ (unsigned int)pid, bytes, 0xFFFFFFFFu, 0xFFFFFFFFu };
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *infos)
{
	if (!valid(d) || count == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	static struct proc_list l;
	l.n = 0;
	fg_scan(&W, d->index, add_proc, &l);
	if (*count < l.n || (l.n > 0 && infos == NULL)) {
		*count = l.n;
		return NVML_ERROR_INSUFFICIENT_SIZE;
	}
	for (unsigned int i = 0; i < l.n; i++)
		infos[i] = l.p[i];
	*count = l.n;
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t d, unsigned long long *types)
{
	if (!valid(d) || types == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	*types = XID_EVENT;
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
	if (!inited)
		return NVML_ERROR_UNINITIALIZED;
	if (set == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	struct fn_set *s = calloc(1, sizeof(*s));
	if (s == NULL)
		return NVML_ERROR_UNKNOWN;
	/* Events that happened before the set existed are not delivered. */
	char p[PATH_MAX + 8];
	snprintf(p, sizeof(p), "%s/xid", W.root);
	struct stat st;
	if (stat(p, &st) == 0)
		s->offset = (long)st.st_size;
	*set = s;
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types, nvmlEventSet_t set)
{
	if (!valid(d) || set == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	if (types & ~XID_EVENT)
		return NVML_ERROR_NOT_SUPPORTED;
	set->types[d->index] |= types;
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
	if (!inited || set == NULL || data == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	char p[PATH_MAX + 8];
	snprintf(p, sizeof(p), "%s/xid", W.root);
	long long deadline = fg_now_ms() + timeoutms;
	for (;;) {
		FILE *f = fopen(p, "r");
		if (f != NULL && fseek(f, set->offset, SEEK_SET) == 0) {
			char line[256];
			while (fgets(line, sizeof(line), f) != NULL && line[strlen(line) - 1] == '\n') {
				set->offset = ftell(f);
				char uuid[64];
				unsigned long long xid;
				if (sscanf(line, "%63s %llu", uuid, &xid) != 2)
					continue;
				int i = fg_find_uuid(&W, uuid);
				if (i < 0 || !(set->types[i] & XID_EVENT))
					continue;
				fclose(f);
				*data = (nvmlEventData_t){ &devs[i], XID_EVENT, xid, 0xFFFFFFFFu, 0xFFFFFFFFu };
				return NVML_SUCCESS;
			}
		}
		if (f != NULL)
			fclose(f);
		if (fg_now_ms() >= deadline)
			return NVML_ERROR_TIMEOUT;
		fg_sleep_ms(10);
	}
}

EXPORT nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
	return nvmlEventSetWait_v2(set, data, timeoutms);
}

EXPORT nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
	if (set == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	free(set);
	return NVML_SUCCESS;
}
