/*
 * bootguest -- a tiny Multiboot v1 test guest for vmsnap.
 *
 * Started with QEMU's `-kernel bootguest.elf -append "mode=counter limit_mb=N"`.
 * Entry is 32-bit protected mode (Multiboot); we build identity page tables
 * (2 MiB pages, first MAX_GIB GiB of guest-physical space), switch to long
 * mode, drop to ring 3 (IOPL 3, interrupts off) and stamp every 4 KiB page of
 * the usable RAM found in the Multiboot memory map, starting at STAMP_MIN
 * (4 MiB, above the kernel, its stack and page tables, which all live below
 * 4 MiB -- checked by the linker script).
 *
 * Why ring 3: on this project's host /dev/kvm is kvm_pvm (nested, paravirtual),
 * which emulates ring-0 code of a non-PVM guest instruction by instruction
 * (~1.6 us each) but runs user mode natively.  So ring 0 only does the minimum
 * (first GiB of page tables, mode switch); the remaining page directories are
 * filled from ring 3 (all mappings are user/writable).
 *
 * Command line (tokens separated by spaces, anywhere on the line):
 *   mode=counter   (default) u64 counter at offset 0 of each page, bytes 8..4095
 *                  zeroed on the first pass (firmware leaves data in RAM)
 *   mode=random    additionally fill bytes 8..4095 on the first pass with
 *                  splitmix64(addr >> 3) for each 8-byte word at guest-physical addr
 *                  (= splitmix64(pfn*512 + word_index), word_index 1..511)
 *   limit_mb=N     stamp at most N MiB (in ascending address order); default all
 *   beat=N         print the heartbeat every N full passes (default: auto, after
 *                  the first pass that completes >= 2^22 page increments since the
 *                  last heartbeat)
 *   ws_mb=N        a small working set: after the first pass (READY) only N MiB of
 *                  pages scattered over all stamped RAM are incremented: every
 *                  `stride`-th page in address order (page index 0, stride, 2*stride,
 *                  ... over the ranges taken as one list), `count` = N*256 pages (at most
 *                  all of them), stride = total pages / count. A pass (and beat=N) is
 *                  then one pass over these pages; the other pages keep counter 1
 *
 * Serial (COM1, 0x3f8) output:
 *   "BOOTGUEST mode=counter\n" or "BOOTGUEST mode=random\n"
 *   "RANGE <start> <end>\n"   per stamped range; 16 lowercase hex digits each,
 *                            no 0x prefix, guest-physical, page aligned, end exclusive
 *   "WORKSET <stride> <count>\n"  with ws_mb=N, before READY (16 hex digits each)
 *   "READY\n"                 after the first pass (every page holds counter 1)
 *   "B"                       heartbeat (no newline), after every heartbeat period
 *
 * Counter semantics: first pass writes 1 to offset 0 of every page; afterwards
 * it loops forever over all pages of all ranges in ascending address order doing
 * `incq` on the counter.  So at any instant the counter sequence is constant
 * except for one edge where it drops by exactly 1.  With ws_mb=N that holds for the
 * working set's pages (in address order); every other page holds 1.
 *
 * splitmix64(x): z = x + 0x9e3779b97f4a7c15;
 *                z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9;
 *                z = (z ^ (z >> 27)) * 0x94d049bb133111eb;
 *                return z ^ (z >> 31)       (all mod 2^64)
 */

        .set MB_MAGIC,    0x1BADB002
        .set MB_FLAGS,    0x00000003          /* page align, memory info */
        .set MB_CHECKSUM, -(MB_MAGIC + MB_FLAGS)

        .set MAX_GIB,     64                  /* identity-mapped guest-physical space */
        .set STAMP_MIN,   0x400000            /* never stamp below 4 MiB */
        .set MAX_RANGES,  32
        .set COM1,        0x3f8
        .set AUTO_BEAT_PAGES, (1 << 22)

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC, MB_FLAGS, MB_CHECKSUM

/* ------------------------------------------------------------------ 32-bit entry */
        .section .text
        .code32
        .globl _start
_start:
        cli
        cld
        movl    %ebx, %esi                    /* keep MBI pointer across bss clear */
        /* clear .bss (page tables, stack, variables) */
        movl    $__bss_start, %edi
        movl    $_end, %ecx
        subl    %edi, %ecx
        shrl    $2, %ecx
        xorl    %eax, %eax
        rep stosl
        movl    %esi, mbi_ptr
        movl    $stack_top, %esp

        /* PML4[0] -> PDPT */
        movl    $pdpt, %eax
        orl     $7, %eax                      /* present | rw | user */
        movl    %eax, pml4
        /* PDPT[i] -> PD[i], i < MAX_GIB */
        movl    $pd, %eax
        orl     $7, %eax
        movl    $pdpt, %edi
        movl    $MAX_GIB, %ecx
1:      movl    %eax, (%edi)
        addl    $4096, %eax
        addl    $8, %edi
        loop    1b
        /* PD entries for the first GiB: 2 MiB pages, identity (the other GiBs are
         * filled by fill_pds in ring 3, where code runs natively under kvm_pvm) */
        movl    $pd, %edi
        xorl    %edx, %edx
2:      movl    %edx, %eax
        shll    $21, %eax
        orl     $0x87, %eax                   /* present | rw | user | PS */
        movl    %eax, (%edi)
        movl    %edx, %eax
        shrl    $11, %eax
        movl    %eax, 4(%edi)
        addl    $8, %edi
        incl    %edx
        cmpl    $512, %edx
        jb      2b

        movl    %cr4, %eax
        orl     $0x20, %eax                   /* CR4.PAE */
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $0xC0000080, %ecx             /* EFER */
        rdmsr
        orl     $0x100, %eax                  /* EFER.LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax             /* CR0.PG | CR0.PE */
        andl    $0x9fffffff, %eax             /* clear CD, NW */
        movl    %eax, %cr0
        lgdt    gdt_desc
        ljmp    $0x08, $long_start

/* ------------------------------------------------------------------ 64-bit code */
        .code64
long_start:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    %ax, %fs
        movw    %ax, %gs
        movq    $stack_top, %rsp
        /* Drop to ring 3 (IOPL=3 so COM1 is reachable) and run everything there:
         * nested/paravirtual KVM (kvm_pvm) emulates ring-0 code of non-PVM guests
         * instruction by instruction but runs user mode natively. */
        pushq   $0x1b                         /* SS: user data, RPL 3 */
        pushq   $stack_top
        pushq   $0x3002                       /* RFLAGS: IOPL=3, IF=0 */
        pushq   $0x23                         /* CS: user code64, RPL 3 */
        pushq   $user_entry
        iretq
user_entry:
        call    main
9:      jmp     9b

/* putc(%al) on COM1 */
putc:
        pushq   %rdx
        pushq   %rax
        movw    $(COM1 + 5), %dx
1:      inb     %dx, %al
        testb   $0x20, %al
        jz      1b
        popq    %rax
        movw    $COM1, %dx
        outb    %al, %dx
        popq    %rdx
        ret

/* puts(%rsi = NUL-terminated string) */
puts:
        pushq   %rsi
        pushq   %rax
1:      movb    (%rsi), %al
        testb   %al, %al
        jz      2f
        call    putc
        incq    %rsi
        jmp     1b
2:      popq    %rax
        popq    %rsi
        ret

/* puthex(%rax): 16 lowercase hex digits */
puthex:
        pushq   %rax
        pushq   %rbx
        pushq   %rcx
        movq    %rax, %rbx
        movl    $16, %ecx
1:      rolq    $4, %rbx
        movl    %ebx, %eax
        andl    $0xf, %eax
        movb    hexdigits(%rax), %al
        call    putc
        loop    1b
        popq    %rcx
        popq    %rbx
        popq    %rax
        ret

/* prefix(%rsi = string, %rdi = NUL-terminated prefix) -> ZF=1 if match, %rdx = after prefix */
prefix:
        pushq   %rax
        pushq   %rdi
        movq    %rsi, %rdx
1:      movb    (%rdi), %al
        testb   %al, %al
        jz      2f                            /* ZF=1: match */
        cmpb    (%rdx), %al
        jne     3f                            /* ZF=0: mismatch */
        incq    %rdi
        incq    %rdx
        jmp     1b
2:      cmpb    %al, %al                      /* ZF=1 */
3:      popq    %rdi
        popq    %rax
        ret

/* atou(%rdx) -> %rax decimal value */
atou:
        pushq   %rcx
        xorl    %eax, %eax
1:      movzbl  (%rdx), %ecx
        subl    $'0', %ecx
        cmpl    $9, %ecx
        ja      2f
        imulq   $10, %rax, %rax
        addq    %rcx, %rax
        incq    %rdx
        jmp     1b
2:      popq    %rcx
        ret

/* ---------------------------------------------------------------- command line */
parse_cmdline:
        movl    mbi_ptr, %ebx
        testl   $4, (%rbx)                    /* MBI flags bit 2: cmdline */
        jz      9f
        movl    16(%rbx), %esi
1:      movb    (%rsi), %al                   /* skip spaces */
        testb   %al, %al
        jz      9f
        cmpb    $' ', %al
        jne     2f
        incq    %rsi
        jmp     1b
2:      movq    $s_mode_random, %rdi
        call    prefix
        jne     3f
        movq    $1, mode
        jmp     8f
3:      movq    $s_mode_counter, %rdi
        call    prefix
        jne     4f
        movq    $0, mode
        jmp     8f
4:      movq    $s_limit, %rdi
        call    prefix
        jne     5f
        call    atou
        shlq    $20, %rax
        movq    %rax, limit_bytes
        movq    $1, have_limit
        jmp     8f
5:      movq    $s_beat, %rdi
        call    prefix
        jne     6f
        call    atou
        movq    %rax, beat_passes
        jmp     8f
6:      movq    $s_ws, %rdi
        call    prefix
        jne     8f
        call    atou
        shlq    $8, %rax                      /* MiB -> 4 KiB pages */
        movq    %rax, ws_count
8:      movb    (%rsi), %al                   /* skip to next space */
        testb   %al, %al
        jz      9f
        cmpb    $' ', %al
        je      1b
        incq    %rsi
        jmp     8b
9:      ret

/* add_range(%rax = start, %rdx = end): clip, align, append */
add_range:
        cmpq    $STAMP_MIN, %rax
        jae     1f
        movq    $STAMP_MIN, %rax
1:      addq    $4095, %rax
        andq    $-4096, %rax
        andq    $-4096, %rdx
        movq    $(MAX_GIB << 30), %rcx
        cmpq    %rcx, %rdx
        jbe     2f
        movq    %rcx, %rdx
2:      cmpq    %rdx, %rax
        jae     9f
        movq    nranges, %rcx
        cmpq    $MAX_RANGES, %rcx
        jae     9f
        shlq    $4, %rcx
        movq    %rax, ranges(%rcx)
        movq    %rdx, ranges+8(%rcx)
        incq    nranges
9:      ret

/* ------------------------------------------------------------------- memory map */
parse_mmap:
        movl    mbi_ptr, %ebx
        testl   $0x40, (%rbx)                 /* flags bit 6: mmap */
        jz      5f
        movl    44(%rbx), %ecx                /* mmap_length */
        movl    48(%rbx), %esi                /* mmap_addr */
        leaq    (%rsi,%rcx), %r8
1:      cmpq    %r8, %rsi
        jae     6f
        movl    (%rsi), %r9d                  /* entry size (excluding this field) */
        cmpl    $1, 20(%rsi)                  /* type 1 = available */
        jne     2f
        movq    4(%rsi), %rax                 /* base */
        movq    12(%rsi), %rdx                /* length */
        addq    %rax, %rdx
        pushq   %rsi
        pushq   %r8
        pushq   %r9
        call    add_range
        popq    %r9
        popq    %r8
        popq    %rsi
2:      leaq    4(%rsi,%r9), %rsi
        jmp     1b
5:      testl   $1, (%rbx)                    /* fallback: mem_upper (KiB above 1 MiB) */
        jz      6f
        movl    8(%rbx), %edx
        shlq    $10, %rdx
        addq    $0x100000, %rdx
        xorl    %eax, %eax
        call    add_range
6:
        /* insertion sort by start */
        movl    $1, %ecx
10:     cmpq    nranges, %rcx
        jae     14f
        movq    %rcx, %rdi
        shlq    $4, %rdi
        movq    ranges(%rdi), %rax
        movq    ranges+8(%rdi), %rdx
11:     testq   %rdi, %rdi
        jz      13f
        cmpq    ranges-16(%rdi), %rax
        jae     13f
        movq    ranges-16(%rdi), %r8
        movq    %r8, ranges(%rdi)
        movq    ranges-8(%rdi), %r8
        movq    %r8, ranges+8(%rdi)
        subq    $16, %rdi
        jmp     11b
13:     movq    %rax, ranges(%rdi)
        movq    %rdx, ranges+8(%rdi)
        incq    %rcx
        jmp     10b
14:
        /* apply limit_mb */
        cmpq    $0, have_limit
        je      20f
        movq    limit_bytes, %r8              /* remaining */
        xorl    %ecx, %ecx
        xorl    %edi, %edi                    /* output count */
15:     cmpq    nranges, %rcx
        jae     19f
        testq   %r8, %r8
        jz      19f
        movq    %rcx, %rsi
        shlq    $4, %rsi
        movq    ranges(%rsi), %rax
        movq    ranges+8(%rsi), %rdx
        movq    %rdx, %r9
        subq    %rax, %r9
        cmpq    %r8, %r9
        jbe     16f
        leaq    (%rax,%r8), %rdx
        movq    %r8, %r9
16:     subq    %r9, %r8
        movq    %rdi, %rsi
        shlq    $4, %rsi
        movq    %rax, ranges(%rsi)
        movq    %rdx, ranges+8(%rsi)
        incq    %rdi
        incq    %rcx
        jmp     15b
19:     movq    %rdi, nranges
20:     ret

/* fill_pds: identity-map GiB 1..MAX_GIB-1 (2 MiB pages, present|rw|user|PS) */
fill_pds:
        movl    $512, %edx
        movq    $pd, %rdi
1:      movq    %rdx, %rax
        shlq    $21, %rax
        orq     $0x87, %rax
        movq    %rax, (%rdi,%rdx,8)
        incq    %rdx
        cmpq    $(MAX_GIB * 512), %rdx
        jb      1b
        ret

/* ------------------------------------------------------------------------- main */
main:
        call    fill_pds
        call    parse_cmdline
        call    parse_mmap

        movq    $s_banner, %rsi
        call    puts
        movq    $s_counter, %rsi
        cmpq    $0, mode
        je      1f
        movq    $s_random, %rsi
1:      call    puts

        /* print ranges, count pages */
        xorl    %ecx, %ecx
        xorl    %r12d, %r12d                  /* total pages */
2:      cmpq    nranges, %rcx
        jae     3f
        movq    %rcx, %rdi
        shlq    $4, %rdi
        movq    $s_range, %rsi
        call    puts
        movq    ranges(%rdi), %rax
        call    puthex
        movb    $' ', %al
        call    putc
        movq    ranges+8(%rdi), %rax
        call    puthex
        movb    $'\n', %al
        call    putc
        movq    ranges+8(%rdi), %rax
        subq    ranges(%rdi), %rax
        shrq    $12, %rax
        addq    %rax, %r12
        incq    %rcx
        jmp     2b
3:      movq    %r12, total_pages
        /* working set: count = min(ws pages, total), stride = total / count */
        movq    ws_count, %rcx
        testq   %rcx, %rcx
        jz      4f
        cmpq    %r12, %rcx
        jbe     5f
        movq    %r12, %rcx
        movq    %rcx, ws_count
5:      movq    %r12, %rax
        xorl    %edx, %edx
        divq    %rcx
        movq    %rax, ws_stride
        movq    $s_workset, %rsi
        call    puts
        call    puthex                        /* %rax = stride */
        movb    $' ', %al
        call    putc
        movq    ws_count, %rax
        call    puthex
        movb    $'\n', %al
        call    putc
4:

        /* constants for splitmix64 */
        movabsq $0x9e3779b97f4a7c15, %r13
        movabsq $0xbf58476d1ce4e5b9, %r14
        movabsq $0x94d049bb133111eb, %r15

        /* first pass */
        xorl    %ecx, %ecx
10:     cmpq    nranges, %rcx
        jae     19f
        movq    %rcx, %rbx
        shlq    $4, %rbx
        movq    ranges(%rbx), %rdi
        movq    ranges+8(%rbx), %rsi
11:     cmpq    %rsi, %rdi
        jae     18f
        movq    $1, (%rdi)
        cmpq    $0, mode
        jne     16f
        /* counter mode: zero bytes 8..4095 (firmware may have left data there) */
        pushq   %rdi
        pushq   %rcx
        addq    $8, %rdi
        movl    $511, %ecx
        xorl    %eax, %eax
        rep stosq
        popq    %rcx
        popq    %rdi
        jmp     17f
16:
        /* random fill: word at address a gets splitmix64(a >> 3), words 1..511 */
        leaq    8(%rdi), %r8
        leaq    4096(%rdi), %r9
12:     movq    %r8, %rax
        shrq    $3, %rax
        addq    %r13, %rax
        movq    %rax, %rdx
        shrq    $30, %rdx
        xorq    %rdx, %rax
        imulq   %r14, %rax
        movq    %rax, %rdx
        shrq    $27, %rdx
        xorq    %rdx, %rax
        imulq   %r15, %rax
        movq    %rax, %rdx
        shrq    $31, %rdx
        xorq    %rdx, %rax
        movq    %rax, (%r8)
        addq    $8, %r8
        cmpq    %r9, %r8
        jb      12b
17:     addq    $4096, %rdi
        jmp     11b
18:     incq    %rcx
        jmp     10b
19:
        movq    $s_ready, %rsi
        call    puts

        /* forever: increment every counter in ascending order */
        xorl    %r10d, %r10d                  /* passes since beat */
        xorl    %r11d, %r11d                  /* pages since beat */
        movq    beat_passes, %r12
        movq    total_pages, %r13
        movq    ws_count, %rax
        testq   %rax, %rax
        jnz     ws_setup
20:     xorl    %ecx, %ecx
21:     cmpq    nranges, %rcx
        jae     25f
        movq    %rcx, %rbx
        shlq    $4, %rbx
        movq    ranges(%rbx), %rdi
        movq    ranges+8(%rbx), %rsi
22:     cmpq    %rsi, %rdi
        jae     24f
        incq    (%rdi)
        addq    $4096, %rdi
        jmp     22b
24:     incq    %rcx
        jmp     21b
25:     incq    %r10
        addq    %r13, %r11
        testq   %r12, %r12
        jz      26f
        cmpq    %r12, %r10
        jb      28f
        jmp     27f
28:     cmpq    $0, ws_count                  /* next pass, no heartbeat */
        je      20b
        jmp     ws_pass
26:     cmpq    $AUTO_BEAT_PAGES, %r11
        jb      28b
27:     movb    $'B', %al
        call    putc
        xorl    %r10d, %r10d
        xorl    %r11d, %r11d
        cmpq    $0, ws_count
        je      20b
        jmp     ws_pass

        /* working-set passes: %r9 = stride in bytes, %r8 = bytes to skip before the
         * next working-set page (carried across ranges), %rdx = pages left this pass */
ws_setup:
        movq    %rax, %r13                    /* pages per pass */
        movq    ws_stride, %r9
        shlq    $12, %r9
ws_pass:
        xorl    %ecx, %ecx
        xorl    %r8d, %r8d
        movq    %r13, %rdx
32:     cmpq    nranges, %rcx
        jae     25b
        movq    %rcx, %rbx
        shlq    $4, %rbx
        movq    ranges(%rbx), %rdi
        movq    ranges+8(%rbx), %rsi
33:     leaq    (%rdi,%r8), %rax
        cmpq    %rsi, %rax
        jae     34f
        movq    %rax, %rdi
        incq    (%rdi)
        movq    %r9, %r8
        decq    %rdx
        jnz     33b
        jmp     25b
34:     subq    %rsi, %rax                    /* what is left to skip past this range */
        movq    %rax, %r8
        incq    %rcx
        jmp     32b

/* ------------------------------------------------------------------------- data */
        .section .rodata
hexdigits:      .ascii "0123456789abcdef"
s_mode_random:  .asciz "mode=random"
s_mode_counter: .asciz "mode=counter"
s_limit:        .asciz "limit_mb="
s_beat:         .asciz "beat="
s_ws:           .asciz "ws_mb="
s_workset:      .asciz "WORKSET "
s_banner:       .asciz "BOOTGUEST mode="
s_counter:      .asciz "counter\n"
s_random:       .asciz "random\n"
s_range:        .asciz "RANGE "
s_ready:        .asciz "READY\n"

        .align 8
gdt:
        .quad   0
        .quad   0x00209A0000000000            /* 0x08: 64-bit code */
        .quad   0x0000920000000000            /* 0x10: data */
        .quad   0x0000F20000000000            /* 0x18: user data (DPL 3) */
        .quad   0x0020FA0000000000            /* 0x20: user code64 (DPL 3) */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt

        .section .bss
        .align 4096
pml4:           .skip 4096
pdpt:           .skip 4096
pd:             .skip 4096 * MAX_GIB
stack:          .skip 16384
stack_top:
mbi_ptr:        .skip 8
mode:           .skip 8
limit_bytes:    .skip 8
have_limit:     .skip 8
beat_passes:    .skip 8
total_pages:    .skip 8
ws_count:       .skip 8                       /* working-set pages (0: all pages) */
ws_stride:      .skip 8
nranges:        .skip 8
ranges:         .skip 16 * MAX_RANGES
