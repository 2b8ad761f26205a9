/*
 * memhog: a process whose memory contents can be checked after a CRIU restore.
 *
 *   memhog MIB OUTFILE [fill|alloc] [SEED]
 *
 * Maps MIB MiB of private anonymous memory (areas of at most 1 GiB, like a model's
 * weights), fills it with a seeded xorshift64 pattern, and also keeps glibc heap memory
 * with the same pattern: one large calloc (an mmap'd chunk) and CHUNKS small malloc
 * chunks. Everything runs in a second thread so those small chunks live in a non-main
 * malloc arena, which glibc builds from ordinary private anonymous mappings. Run with
 * MALLOC_ARENA_MAX=1, they live in the main arena instead, i.e. in the brk heap
 * ([heap]), which the mmap engine maps too (patches/criu/0003).
 * A 256 KiB area marked MADV_WIPEONFORK (as RNG state often is) must come back too:
 * the kernel refuses that advice on a file mapping, so mmap must leave it anonymous.
 * Prints "ready <checksum>" once filled.
 *
 * On SIGUSR1:
 *   fill   recompute the checksum of every area (touching every page) and write
 *          "sum <hex>" to OUTFILE.
 *   alloc  the allocator experiment: overwrite the first MiB of the raw area, release it
 *          with MADV_DONTNEED and report what reading it gives back ("raw=image": the
 *          dump-time pattern, as a MAP_PRIVATE file mapping does; "raw=zero": fresh
 *          anonymous pages); then free every small chunk, malloc_trim(0), calloc the same
 *          sizes and count non-zero bytes ("calloc_nonzero=N"). Then the checksum line.
 * OUTFILE is written to OUTFILE.tmp and renamed, so a reader never sees half of it.
 *
 *   memhog MIB - prefault
 *
 * maps MIB MiB with MADV_HUGEPAGE, writes every page and exits: the benchmark runs it right
 * before a restore so that the free 2 MiB blocks are backed by the host again (a VM with
 * free page reporting hands them back to the hypervisor; see criu_ops.free_page_reporting).
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define AREA_MAX (1024UL << 20)
#define BIG_CALLOC (8UL << 20)
#define CHUNKS 256
#define CHUNK_SIZE (64UL << 10) /* below glibc's mmap threshold: lives in the arena */
#define MAX_AREAS 64

static unsigned long nareas;
static uint64_t *areas[MAX_AREAS];
static size_t area_len[MAX_AREAS];
static uint64_t *big;
static uint64_t *wipe;
#define WIPE_LEN (256UL << 10)
static uint64_t *chunks[CHUNKS];
static uint64_t seed = 0x9e3779b97f4a7c15ULL;
static const char *outfile;
static int alloc_mode;

static void fill(uint64_t *p, size_t len, uint64_t *state)
{
	uint64_t x = *state;
	for (size_t i = 0; i < len / 8; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		p[i] = x;
	}
	*state = x;
}

static uint64_t sum(const uint64_t *p, size_t len, uint64_t h)
{
	/* four independent lanes: memory bound, not multiply bound */
	uint64_t a = h, b = h ^ 1, c = h ^ 2, d = h ^ 3;
	size_t n = len / 8, i;
	for (i = 0; i + 4 <= n; i += 4) {
		a = (a ^ p[i]) * 0x100000001b3ULL;
		b = (b ^ p[i + 1]) * 0x100000001b3ULL;
		c = (c ^ p[i + 2]) * 0x100000001b3ULL;
		d = (d ^ p[i + 3]) * 0x100000001b3ULL;
	}
	for (; i < n; i++)
		a = (a ^ p[i]) * 0x100000001b3ULL;
	return a ^ (b << 1) ^ (c << 2) ^ (d << 3);
}

static uint64_t checksum(void)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (unsigned long i = 0; i < nareas; i++)
		h = sum(areas[i], area_len[i], h);
	h = sum(big, BIG_CALLOC, h);
	h = sum(wipe, WIPE_LEN, h);
	for (int i = 0; i < CHUNKS; i++)
		h = sum(chunks[i], CHUNK_SIZE, h);
	return h;
}

static void report(const char *text)
{
	char tmp[4096];
	FILE *f;
	snprintf(tmp, sizeof(tmp), "%s.tmp", outfile);
	f = fopen(tmp, "w");
	if (!f) {
		perror("fopen");
		return;
	}
	fputs(text, f);
	fclose(f);
	rename(tmp, outfile);
}

static void allocator_experiment(char *out, size_t cap)
{
	uint64_t *raw = areas[0];
	size_t len = area_len[0] < (1UL << 20) ? area_len[0] : (1UL << 20);
	uint64_t state = seed, expect0;
	size_t nonzero = 0, zero_words = 0, image_words = 0;
	const char *raw_kind;

	/* what the pattern's first words were at dump time */
	uint64_t *pattern = malloc(len);
	fill(pattern, len, &state);
	memset(raw, 0xaa, len);
	madvise(raw, len, MADV_DONTNEED);
	for (size_t i = 0; i < len / 8; i++) {
		if (raw[i] == 0)
			zero_words++;
		else if (raw[i] == pattern[i])
			image_words++;
	}
	expect0 = pattern[0];
	free(pattern);
	if (image_words == len / 8)
		raw_kind = "image";
	else if (zero_words == len / 8)
		raw_kind = "zero";
	else
		raw_kind = "mixed";
	/* put the pattern back so the checksum stays comparable */
	state = seed;
	fill(raw, len, &state);

	for (int i = 0; i < CHUNKS; i++)
		free(chunks[i]);
	malloc_trim(0);
	for (int i = 0; i < CHUNKS; i++) {
		unsigned char *c = calloc(1, CHUNK_SIZE);
		for (size_t j = 0; j < CHUNK_SIZE; j++)
			nonzero += c[j] != 0;
		chunks[i] = (uint64_t *)c;
	}
	/* refill so the checksum line stays comparable with fill mode */
	state = seed ^ 0x5555;
	for (int i = 0; i < CHUNKS; i++)
		fill(chunks[i], CHUNK_SIZE, &state);
	snprintf(out, cap, "raw=%s first=%llx expect=%llx\ncalloc_nonzero=%zu\n", raw_kind,
		 (unsigned long long)raw[0], (unsigned long long)expect0, nonzero);
}

static void *run(void *arg)
{
	uint64_t state = seed, total = (uint64_t)(uintptr_t)arg;
	sigset_t set;
	int sig;

	for (uint64_t left = total; left; nareas++) {
		size_t len = left < AREA_MAX ? left : AREA_MAX;
		void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED || nareas == MAX_AREAS) {
			perror("mmap");
			exit(1);
		}
		areas[nareas] = p;
		area_len[nareas] = len;
		left -= len;
	}
	for (unsigned long i = 0; i < nareas; i++) {
		state = seed + i; /* area i restarts the stream: area 0's start is known */
		if (i == 0)
			state = seed;
		fill(areas[i], area_len[i], &state);
	}
	wipe = mmap(NULL, WIPE_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (wipe == MAP_FAILED || madvise(wipe, WIPE_LEN, MADV_WIPEONFORK)) {
		perror("wipeonfork area");
		exit(1);
	}
	state = seed ^ 0x7777;
	fill(wipe, WIPE_LEN, &state);
	big = calloc(1, BIG_CALLOC);
	state = seed ^ 0xaaaa;
	fill(big, BIG_CALLOC / 2, &state); /* half pattern, half calloc's zeros */
	state = seed ^ 0x5555;
	for (int i = 0; i < CHUNKS; i++) {
		chunks[i] = malloc(CHUNK_SIZE);
		fill(chunks[i], CHUNK_SIZE, &state);
	}
	printf("ready %016llx\n", (unsigned long long)checksum());
	fflush(stdout);

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	for (;;) {
		char out[1024] = "";
		size_t used;
		if (sigwait(&set, &sig))
			continue;
		if (alloc_mode)
			allocator_experiment(out, sizeof(out));
		used = strlen(out);
		snprintf(out + used, sizeof(out) - used, "sum %016llx\n", (unsigned long long)checksum());
		report(out);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t;
	sigset_t set;
	unsigned long mib;

	if (argc < 3) {
		fprintf(stderr, "usage: %s MIB OUTFILE [fill|alloc] [SEED]\n", argv[0]);
		return 2;
	}
	mib = strtoul(argv[1], NULL, 0);
	outfile = argv[2];
	if (argc > 3 && !strcmp(argv[3], "prefault")) {
		size_t len = mib << 20;
		char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) {
			perror("mmap");
			return 1;
		}
		madvise(p, len, MADV_HUGEPAGE);
		for (size_t i = 0; i < len; i += 4096)
			p[i] = 1;
		return 0;
	}
	alloc_mode = argc > 3 && !strcmp(argv[3], "alloc");
	if (argc > 4)
		seed = strtoull(argv[4], NULL, 0) | 1;
	if (!mib) {
		fprintf(stderr, "MIB must be > 0\n");
		return 2;
	}
	/* SIGUSR1 is taken with sigwait() in the worker: block it everywhere */
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	if (pthread_create(&t, NULL, run, (void *)(uintptr_t)(mib << 20))) {
		perror("pthread_create");
		return 1;
	}
	pthread_join(t, NULL);
	return 0;
}
