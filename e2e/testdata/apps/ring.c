/*
 * An MPI program for the tests: every step each rank updates its share of
 * an array, the ranks sum it (MPI_Allreduce) and pass a slice around the
 * ring (MPI_Sendrecv_replace); rank 0 prints the sum, to stdout and to a
 * log of its own. The result is a hash of every sum: any step computed
 * differently, lost or repeated changes it.
 *
 *   ring STEPS DELAY_MS LOG
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { N = 1 << 16, SLICE = 1024 };

int main(int argc, char **argv)
{
	int rank, size;
	if (argc != 4) {
		fprintf(stderr, "usage: ring STEPS DELAY_MS LOG\n");
		return 2;
	}
	int steps = atoi(argv[1]);
	long delay = atol(argv[2]);
	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	FILE *log = NULL;
	if (rank == 0 && !(log = fopen(argv[3], "a"))) {
		perror(argv[3]);
		MPI_Abort(MPI_COMM_WORLD, 2);
	}
	double *a = malloc(N * sizeof *a);
	for (int i = 0; i < N; i++)
		a[i] = rank + i * 1e-6;
	unsigned long long h = 1469598103934665603ULL;
	for (int s = 1; s <= steps; s++) {
		double local = 0, sum;
		for (int i = 0; i < N; i++) {
			a[i] = a[i] * 0.999 + 0.001 * (s + rank);
			local += a[i];
		}
		MPI_Allreduce(&local, &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
		MPI_Sendrecv_replace(a, SLICE, MPI_DOUBLE, (rank + 1) % size, s, (rank + size - 1) % size, s,
				     MPI_COMM_WORLD, MPI_STATUS_IGNORE);
		unsigned char b[sizeof sum];
		memcpy(b, &sum, sizeof sum);
		for (size_t k = 0; k < sizeof b; k++)
			h = (h ^ b[k]) * 1099511628211ULL;
		if (rank == 0) {
			printf("step %d %.17g\n", s, sum);
			fflush(stdout);
			fprintf(log, "step %d %.17g\n", s, sum);
			fflush(log);
		}
		struct timespec ts = {delay / 1000, (delay % 1000) * 1000000L};
		nanosleep(&ts, NULL);
	}
	if (rank == 0) {
		printf("result %016llx\n", h);
		fprintf(log, "result %016llx\n", h);
		fclose(log);
	}
	MPI_Finalize();
	return 0;
}
