/*
 * tbprof: a QEMU TCG plugin for `cargo xtask profile`.
 *
 * Counts how often each translated block runs (an inline add, so the
 * guest's timing is barely disturbed) and, when QEMU exits, writes one line
 * per block that ran:
 *
 *     VADDR HADDR INSNS COUNT        (hex, hex, decimal, decimal)
 *
 * VADDR is the block's guest virtual address, HADDR the host address of
 * its first instruction's bytes (guest RAM is one host mapping, so HADDR
 * minus the RAM's host base is the guest physical address), INSNS the
 * instructions in the block. A block translated twice is two lines;
 * xtask adds them up. The argument `out=FILE` names the output file.
 *
 * QEMU's plugin API (version 1, QEMU 4.2 to 8.x) is declared here rather
 * than included, since distributions do not ship qemu-plugin.h: only the
 * calls below are used, with their documented signatures.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
typedef struct {
    const char *target_name;
    struct { int min, cur; } version;
    bool system_emulation;
    union { struct { int smp_vcpus, max_vcpus; } system; };
} qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };

void qemu_plugin_register_vcpu_tb_trans_cb(
    qemu_plugin_id_t, void (*)(qemu_plugin_id_t, struct qemu_plugin_tb *));
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *, enum qemu_plugin_op,
                                              void *, uint64_t);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, void (*)(qemu_plugin_id_t, void *), void *);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *, size_t);
void *qemu_plugin_insn_haddr(const struct qemu_plugin_insn *);

EXPORT int qemu_plugin_version = 1;

struct block {
    uint64_t vaddr, haddr, insns, count;
    struct block *next;
};

static struct block *blocks;
static const char *out_path = "tbprof.txt";

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    struct block *b = calloc(1, sizeof *b);
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (!b || n == 0) {
        free(b);
        return;
    }
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->haddr = (uint64_t)(uintptr_t)qemu_plugin_insn_haddr(qemu_plugin_tb_get_insn(tb, 0));
    b->insns = n;
    b->next = blocks;
    blocks = b;
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->count, 1);
}

static void write_blocks(qemu_plugin_id_t id, void *unused)
{
    FILE *f = fopen(out_path, "w");
    if (!f) {
        perror(out_path);
        return;
    }
    for (struct block *b = blocks; b; b = b->next)
        if (b->count)
            fprintf(f, "%llx %llx %llu %llu\n", (unsigned long long)b->vaddr,
                    (unsigned long long)b->haddr, (unsigned long long)b->insns,
                    (unsigned long long)b->count);
    fclose(f);
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
                               char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0)
            out_path = argv[i] + 4;
        else {
            fprintf(stderr, "tbprof: unknown argument %s (expected out=FILE)\n", argv[i]);
            return 1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, write_blocks, NULL);
    return 0;
}
