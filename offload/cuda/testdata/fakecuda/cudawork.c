/*
 * cudawork.c: a CUDA test workload whose result depends on device memory
 * across every step. It links nothing: it dlopens the driver named by
 * $CUDAWORK_LIBCUDA (default libcuda.so.1), which in tests is the fake of
 * fakecuda.c. Build:
 *
 *   gcc -O2 -o cudawork cudawork.c -ldl
 *
 * Usage: cudawork [-steps N] [-kib K] [-delay MS] [-device D]
 *
 * It fills K KiB of device memory from a seed, then for N steps launches
 * the fake "mix" kernel over all of it, reads a few words back and folds
 * them into a running hash; at the end it folds in all of device memory.
 * It prints "ready PID" once its context exists, "step S" after each step
 * and "result HEX" at the end; a CUDA error prints "cuda error: NAME in
 * CALL" and exits 3. A run that was checkpointed and restored, with its
 * device memory carried across, prints the same result as one that was not.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;

static CUresult (*cuInit)(unsigned int);
static CUresult (*cuDeviceGet)(CUdevice *, int);
static CUresult (*cuCtxCreate)(CUcontext *, unsigned int, CUdevice);
static CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
static CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t);
static CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t);
static CUresult (*cuCtxSynchronize)(void);
static CUresult (*cuGetErrorName)(CUresult, const char **);
static CUresult (*fakeLaunchKernel)(int, CUdeviceptr, size_t, unsigned long long);

static void check(CUresult r, const char *call)
{
	if (r == 0)
		return;
	const char *name = NULL;
	if (cuGetErrorName == NULL || cuGetErrorName(r, &name) != 0 || name == NULL)
		name = "unknown";
	printf("cuda error: %s (%d) in %s\n", name, r, call);
	fflush(stdout);
	exit(3);
}

static void *sym(void *h, const char *name)
{
	void *p = dlsym(h, name);
	if (p == NULL) {
		printf("cudawork: %s: %s\n", name, dlerror());
		exit(2);
	}
	return p;
}

static unsigned long long fold(unsigned long long h, unsigned long long v)
{
	h ^= v + 0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2);
	return h * 0xff51afd7ed558ccdULL;
}

int main(int argc, char **argv)
{
	int steps = 100, kib = 1024, delay = 20, device = 0;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (strcmp(argv[i], "-steps") == 0)
			steps = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "-kib") == 0)
			kib = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "-delay") == 0)
			delay = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "-device") == 0)
			device = atoi(argv[i + 1]);
		else {
			fprintf(stderr, "usage: cudawork [-steps N] [-kib K] [-delay MS] [-device D]\n");
			return 2;
		}
	}
	const char *lib = getenv("CUDAWORK_LIBCUDA");
	void *h = dlopen(lib && *lib ? lib : "libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
	if (h == NULL) {
		printf("cudawork: %s\n", dlerror());
		return 2;
	}
	cuInit = sym(h, "cuInit");
	cuDeviceGet = sym(h, "cuDeviceGet");
	cuCtxCreate = sym(h, "cuCtxCreate_v2");
	cuMemAlloc = sym(h, "cuMemAlloc_v2");
	cuMemcpyHtoD = sym(h, "cuMemcpyHtoD_v2");
	cuMemcpyDtoH = sym(h, "cuMemcpyDtoH_v2");
	cuCtxSynchronize = sym(h, "cuCtxSynchronize");
	cuGetErrorName = sym(h, "cuGetErrorName");
	fakeLaunchKernel = sym(h, "fakeLaunchKernel");

	check(cuInit(0), "cuInit");
	CUdevice dev;
	check(cuDeviceGet(&dev, device), "cuDeviceGet");
	CUcontext ctx;
	check(cuCtxCreate(&ctx, 0, dev), "cuCtxCreate");
	size_t bytes = (size_t)kib << 10;
	size_t words = bytes / 8;
	CUdeviceptr buf;
	check(cuMemAlloc(&buf, bytes), "cuMemAlloc");
	unsigned long long *host = malloc(bytes);
	unsigned long long x = 0x9E3779B97F4A7C15ULL;
	for (size_t i = 0; i < words; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		host[i] = x;
	}
	check(cuMemcpyHtoD(buf, host, bytes), "cuMemcpyHtoD");
	memset(host, 0, bytes); /* from now on the state is on the device only */
	printf("ready %d\n", (int)getpid());
	fflush(stdout);

	unsigned long long hash = 0;
	for (int s = 1; s <= steps; s++) {
		check(fakeLaunchKernel(1, buf, bytes, (unsigned long long)s), "fakeLaunchKernel");
		unsigned long long probe[4];
		size_t at = ((size_t)s * 4099 * 8) % (bytes - sizeof(probe));
		at &= ~(size_t)7;
		check(cuMemcpyDtoH(probe, buf + at, sizeof(probe)), "cuMemcpyDtoH");
		for (int k = 0; k < 4; k++)
			hash = fold(hash, probe[k]);
		printf("step %d\n", s);
		fflush(stdout);
		if (delay > 0) {
			struct timespec ts = { delay / 1000, (long)(delay % 1000) * 1000000L };
			nanosleep(&ts, NULL);
		}
	}
	check(cuCtxSynchronize(), "cuCtxSynchronize");
	check(cuMemcpyDtoH(host, buf, bytes), "cuMemcpyDtoH");
	for (size_t i = 0; i < words; i++)
		hash = fold(hash, host[i]);
	printf("result %016llx\n", hash);
	fflush(stdout);
	return 0;
}
