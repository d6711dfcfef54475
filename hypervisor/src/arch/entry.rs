//! The PVH entry: QEMU starts us here in 32-bit protected mode with paging
//! off and EBX pointing at `hvm_start_info`.
//!
//! The trampoline builds boot page tables that identity-map the first 4 GiB
//! with 2 MiB pages and map the first 1 GiB again at `KERNEL_BASE`, turns on
//! long mode (with NX and write protection), and calls `kernel_main(start_info,
//! entry_tsc)` at its higher-half address. `boot::kernel_main` replaces these
//! tables with its own as soon as it has a frame allocator.

use core::arch::global_asm;

global_asm!(
    r#"
    .section .note.Xen, "a"
    .balign 4
    .long 4                 /* name size: "Xen\0" */
    .long 8                 /* descriptor size: a 64-bit address */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_entry32

    .section .boot.text, "awx"
    .code32
    .global pvh_entry32
pvh_entry32:
    cli
    cld
    mov %ebx, %esi                      /* start_info, kept for kernel_main */
    rdtsc
    mov %eax, %edi                      /* entry TSC, low half */
    mov %edx, %ebp                      /* entry TSC, high half */

    /* PML4[0] -> identity PDPT, PML4[511] -> higher-half PDPT. */
    movl $(boot_pdpt_lo + 3), boot_pml4
    movl $(boot_pdpt_hi + 3), boot_pml4 + 511 * 8
    /* Identity PDPT[0..4] -> the four PDs. */
    mov $(boot_pd + 3), %eax
    mov $boot_pdpt_lo, %ebx
    mov $4, %ecx
1:  mov %eax, (%ebx)
    add $4096, %eax
    add $8, %ebx
    loop 1b
    /* KERNEL_BASE is PML4[511], PDPT[510]: the first GiB again. */
    movl $(boot_pd + 3), boot_pdpt_hi + 510 * 8
    /* 2048 PD entries: 2 MiB pages, present | writable | large. */
    mov $boot_pd, %ebx
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, (%ebx, %ecx, 8)
    inc %ecx
    cmp $2048, %ecx
    jb 2b

    mov %cr4, %eax
    or $0x20, %eax                      /* PAE */
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx               /* EFER */
    rdmsr
    or $0x900, %eax                     /* LME | NXE */
    wrmsr
    mov %cr0, %eax
    or $0x80010001, %eax                /* PG | WP | PE */
    mov %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $boot_entry64

    .code64
boot_entry64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    movabs $boot_stack_top, %rsp
    /* Upper halves are undefined after the mode switch: 32-bit moves clear them. */
    mov %edi, %eax
    mov %ebp, %edx
    shl $32, %rdx
    or %rdx, %rax
    mov %esi, %edi                      /* arg 0: start_info physical address */
    mov %rax, %rsi                      /* arg 1: TSC at entry */
    xor %ebp, %ebp
    movabs $kernel_main, %rax
    call *%rax
    ud2

    .section .boot.data, "aw"
    .balign 4096
boot_pml4:    .fill 512, 8, 0
boot_pdpt_lo: .fill 512, 8, 0
boot_pdpt_hi: .fill 512, 8, 0
boot_pd:      .fill 2048, 8, 0
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 64-bit code */
    .quad 0x00cf92000000ffff            /* data */
boot_gdt_ptr:
    .word 3 * 8 - 1
    .long boot_gdt

    .section .bss.boot_stack, "aw", @nobits
    .balign 16
boot_stack:
    .skip 65536
boot_stack_top:
    "#,
    options(att_syntax)
);
