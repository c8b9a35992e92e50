/*
 * The whole CPL0 part of the probe (AT&T syntax, assembled by rustc's
 * global_asm!). Keep it tiny: on the target machines every instruction
 * executed here goes through a slow emulator (~1.3M instr/s), and XRSTOR,
 * INT3, POPCNT, CLAC, FWAIT and VMCALL/VMMCALL must never appear.
 *
 * Memory layout is static: the image is linked and loaded at 1 MiB and
 * identity mapped; the page tables for 0-4 GiB are assembled as data
 * (no loop at run time). CPL3 Rust code extends them (RAM above 4 GiB,
 * MMIO windows) by writing the user-accessible tables and asking CPL0 to
 * reload CR3 through the service gate.
 *
 * The only way from CPL3 into CPL0 is a hardware exception: the service
 * gate is the `ud2` at `probe_svc` (CPL3 code calls it; the #UD handler
 * recognises that one address, skips the ud2 and dispatches on EAX). CPL3
 * runs with IOPL=0, so every port access, cli, sti and hlt goes through
 * the gate: on some hosts (kvm-pvm) `in`, `out`, `cli` and `sti` at CPL3
 * fault whatever the IOPL, and `int n` from CPL3 never reaches the IDT.
 *
 * Faults at CPL3 run the Rust handler on a per-CPU fault stack; a second
 * fault before that handler has finished (a fault in the fault path) prints
 * one last line from CPL0 and resets the VM. Guard pages (unmapped by
 * paging.rs) sit below every user and fault stack block.
 *
 * Selectors:  0x08 kernel code 64, 0x10 kernel data, 0x18|3 user data,
 *             0x20|3 user code 64, 0x28 kernel code 32,
 *             0x38 + 16*i: TSS of CPU i.
 */

.set MAX_CPUS, 64
.set KSTACK_SIZE, 4096
.set TSS_STRIDE, 128
.set BSP_USTACK_SIZE, 262144
.set AP_USTACK_SIZE, 16384
.set BSP_FSTACK_SIZE, 32768
.set AP_FSTACK_SIZE, 4096
.set GUARD_SIZE, 4096
/* CR4 = PAE | OSFXSR | OSXMMEXCPT (SSE at CPL3; no SMEP/SMAP/PGE/LA57) */
.set CR4_VALUE, 0x620
/* CR0 = PG | NE | ET | MP | PE; no EM/TS so SSE works, caches on */
.set CR0_VALUE, 0x80000033
.set USER_RFLAGS, 0x0002        /* IOPL=0, IF=0 */
.set COM1, 0x3f8
.set SVC_COUNT, 12
.set LAPIC_EOI, 0xfee000b0

/* ---------------------------------------------------------------- notes */
.pushsection .note.pvh, "a", @note
.balign 4
.long 4                         /* namesz: "Xen\0" */
.long 8                         /* descsz */
.long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
.asciz "Xen"
.balign 4
.quad pvh_entry
.balign 4
.popsection

/* ---------------------------------------------------------------- text */
.pushsection .text.entry, "ax"

/* Linux x86_64 64-bit boot protocol: long mode, RSI = boot_params. */
.code64
.global linux64_entry
linux64_entry:
    cli
    mov %rsi, %r8
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, entry_state+32(%rip)
    movq $1, entry_state(%rip)
    mov %r8, entry_state+8(%rip)
    mov %cs, %eax
    movzwl %ax, %eax
    mov %rax, entry_state+16(%rip)
    mov %cr0, %rax
    mov %rax, entry_state+40(%rip)
    mov %cr4, %rax
    mov %rax, entry_state+48(%rip)
    mov $0xc0000080, %ecx
    rdmsr
    mov %eax, entry_state+56(%rip)
    mov %edx, entry_state+60(%rip)
    lea kstacks+KSTACK_SIZE(%rip), %rsp
    pushfq
    pop %rax
    mov %rax, entry_state+24(%rip)
    lgdt gdtr(%rip)
    lea pml4(%rip), %rax
    mov %rax, %cr3
    mov $CR4_VALUE, %eax
    mov %rax, %cr4
    mov $CR0_VALUE, %eax
    mov %rax, %cr0
    jmp bsp64

/* PVH: 32-bit protected mode, paging off, EBX = hvm_start_info. */
.code32
.global pvh_entry
pvh_entry:
    cli
    mov %ebx, %edi
    rdtsc
    mov %eax, entry_state+32
    mov %edx, entry_state+36
    movl $2, entry_state
    mov %edi, entry_state+8
    xor %eax, %eax
    mov %cs, %ax
    mov %eax, entry_state+16
    mov %cr0, %eax
    mov %eax, entry_state+40
    mov %cr4, %eax
    mov %eax, entry_state+48
    mov $(kstacks + KSTACK_SIZE), %esp
    pushfl
    pop %eax
    mov %eax, entry_state+24
    lgdt gdtr
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $bsp64, %ebp
    jmp long_mode_32

/* Enter long mode from 32-bit protected mode; continue at EBP (64-bit). */
long_mode_32:
    mov $CR4_VALUE, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov $CR0_VALUE, %eax
    mov %eax, %cr0
    ljmpl $0x08, $lm_jump
.code64
lm_jump:
    mov %ebp, %ebp
    jmp *%rbp

/* Boot CPU, long mode, our GDT and page tables loaded. */
bsp64:
    lea kstacks+KSTACK_SIZE(%rip), %rsp
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    /* IDT: 256 interrupt gates to the 16-byte stubs, DPL0 */
    lea idt(%rip), %rdi
    lea isr_stubs(%rip), %rsi
    mov $256, %ecx
1:  mov %rsi, %rax
    mov %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    add $16, %rsi
    add $16, %rdi
    dec %ecx
    jnz 1b
    lidt idtr(%rip)
    /* TSS of CPU 0: RSP0 and the descriptor in GDT slot 7 */
    lea tss_array(%rip), %rdi
    lea kstacks+KSTACK_SIZE(%rip), %rax
    mov %rax, 4(%rdi)
    movw $104, 102(%rdi)
    mov %rdi, %rax
    and $0xffffff, %eax
    shl $16, %rax
    or $103, %rax
    mov $0x89, %ecx
    shl $40, %rcx
    or %rcx, %rax
    mov %rdi, %rcx
    shr $24, %rcx
    and $0xff, %ecx
    shl $56, %rcx
    or %rcx, %rax
    mov %rax, gdt+0x38(%rip)
    mov %rdi, %rcx
    shr $32, %rcx
    mov %rcx, gdt+0x40(%rip)
    mov $0x38, %eax
    ltr %ax
    xor %edi, %edi
    lea bsp_ustack+BSP_USTACK_SIZE-8(%rip), %rsi
    lea probe_main(%rip), %rdx
    jmp enter_user

/* iretq to CPL3: RDI = argument, RSI = stack, RDX = entry. */
enter_user:
    push $0x1b
    push %rsi
    push $USER_RFLAGS
    push $0x23
    push %rdx
    iretq

/* AP: real-mode trampoline, copied to a free page below 1 MiB by CPL3. */
.code16
.global ap_tramp_start
.global ap_tramp_end
ap_tramp_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (ap_tramp_gdtr - ap_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x28, $ap_entry32
.balign 8
ap_tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

.code32
ap_entry32:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $ap64, %ebp
    jmp long_mode_32

.code64
ap64:
    mov ap_boot+8(%rip), %rsp
    lidt idtr(%rip)
    mov ap_boot+24(%rip), %eax
    ltr %ax
    mov ap_boot(%rip), %rdi
    mov ap_boot+16(%rip), %rsi
    lea ap_main(%rip), %rdx
    jmp enter_user

/*
 * The service gate, called from CPL3 (`call probe_svc`). Its ud2 raises
 * #UD; ud_entry sees CPL3 and this RIP, skips the ud2 and runs the service
 * on the kernel stack with IF=0 (interrupt gate). Nothing else at CPL3 can
 * enter CPL0 on purpose: any other exception is a fault.
 */
.global probe_svc
probe_svc:
svc_ud2:
    ud2
    ret

/*
 * EAX = function, RDI and RSI = arguments; result in EAX (and EBX, ECX,
 * EDX for cpuid, EDX for rdmsr). Clobbers at most RAX, RBX, RCX, RDX, RDI,
 * RSI. An unknown function returns EAX = 0xffffffff.
 *  0 cpuid(EDI leaf, ESI subleaf)   1 CR3 = RDI        2 rdmsr(EDI)
 *  3 reset (i8042, then triple fault)                  4 sti; hlt; cli
 *  5 outb(port DI, value SIL)       6 inb(port DI)     7 IF=1 at CPL3
 *  8 IF=0 at CPL3   9 write RSI bytes at RDI to COM1 (at most 4096)
 * 10 this CPU's index (from its TSS selector)
 * 11 wrmsr(EDI, RSI)
 */
svc_entry:
    mov %eax, %eax
    cmp $SVC_COUNT, %eax
    jae 1f
    jmp *svc_table(,%rax,8)
1:  mov $-1, %eax
    iretq
svc_cpuid:
    mov %edi, %eax
    mov %esi, %ecx
    cpuid
    iretq
svc_cr3:
    mov %rdi, %cr3
    iretq
svc_rdmsr:
    mov %edi, %ecx
    rdmsr
    iretq
svc_wait_irq:
    sti
    hlt
    cli
    iretq
svc_outb:
    mov %esi, %eax
    mov %edi, %edx
    out %al, %dx
    iretq
svc_inb:
    mov %edi, %edx
    xor %eax, %eax
    in %dx, %al
    iretq
svc_sti:
    orq $0x200, 16(%rsp)
    iretq
svc_cli:
    andq $-513, 16(%rsp)
    iretq
svc_write:
    call cpl0_puts
    iretq
svc_cpu:
    call cpu_index
    iretq
svc_wrmsr:
    mov %edi, %ecx
    mov %rsi, %rax
    mov %rsi, %rdx
    shr $32, %rdx
    wrmsr
    iretq

/* EAX = index of this CPU (TSS selectors are 0x38 + 16 * index). */
cpu_index:
    xor %eax, %eax
    str %ax
    sub $0x38, %eax
    shr $4, %eax
    ret

/* COM1 output at CPL0: RDI = bytes, RSI = length (at most 4096). */
cpl0_puts:
    cmp $4096, %rsi
    jbe 1f
    mov $4096, %esi
1:  test %rsi, %rsi
    jz 3f
2:  movzbl (%rdi), %eax
    call cpl0_putc
    inc %rdi
    dec %rsi
    jnz 2b
3:  ret

/* One byte (AL) to COM1; waits for THRE a bounded number of polls.
 * Clobbers EAX, ECX, EDX. */
cpl0_putc:
    mov %al, %ah
    mov $COM1+5, %edx
    mov $100000, %ecx
1:  in %dx, %al
    test $0x20, %al
    jnz 2f
    dec %ecx
    jnz 1b
2:  mov %ah, %al
    mov $COM1, %edx
    out %al, %dx
    ret

/* RDI as hex without leading zeros ("0x0" for zero). */
cpl0_puthex:
    mov %rdi, %r9
    mov $0x30, %eax             /* '0' */
    call cpl0_putc
    mov $0x78, %eax             /* 'x' */
    call cpl0_putc
    mov $60, %r10d
    xor %r11d, %r11d
1:  mov %r9, %rax
    mov %r10d, %ecx
    shr %cl, %rax
    and $15, %eax
    or %eax, %r11d
    jnz 2f
    test %r10d, %r10d
    jnz 3f
2:  cmp $10, %eax
    jb 4f
    add $0x27, %eax             /* 'a' - '0' - 10 */
4:  add $0x30, %eax
    call cpl0_putc
3:  sub $4, %r10d
    jns 1b
    ret

/* The end of a run that cannot go on: i8042 reset, then a triple fault. */
cpl0_reset:
    mov $0xfe, %al
    out %al, $0x64
    lidt null_idtr(%rip)
    ud2

/*
 * A fault at CPL3 while this CPU's fault handler had not finished: no
 * second redirect (that recursed down the stack once). One last line from
 * CPL0, then the reset path. RDI = vector, RDX = faulting RIP.
 */
fatal_nested:
    mov %rdi, %r12
    mov %rdx, %r13
    lea msg_nested(%rip), %rdi
    mov $msg_nested_end - msg_nested, %esi
    call cpl0_puts
    mov %r12, %rdi
    call cpl0_puthex
    lea msg_rip(%rip), %rdi
    mov $msg_rip_end - msg_rip, %esi
    call cpl0_puts
    mov %r13, %rdi
    call cpl0_puthex
    mov $10, %eax               /* newline */
    call cpl0_putc
    jmp cpl0_reset

/* #UD: the service gate when it comes from CPL3 at svc_ud2, else a fault. */
ud_entry:
    testb $3, 8(%rsp)
    jz 1f
    push %rax
    lea svc_ud2(%rip), %rax
    cmp %rax, 8(%rsp)
    pop %rax
    jne 1f
    addq $2, (%rsp)
    jmp svc_entry
1:  push $0
    push $6
    jmp isr_common

/* 256 stubs of 16 bytes: push a dummy error code if the CPU did not. */
.balign 16
isr_stubs:
.set vec, 0
.rept 256
    .balign 16
    .if vec == 6
    jmp ud_entry
    .else
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    push $0
    .endif
    push $vec
    jmp isr_common
    .endif
    .set vec, vec + 1
.endr

/*
 * Stack: rax, vector, error, rip, cs, rflags, rsp, ss.
 * Interrupts (>= 32): count, EOI (not for the spurious vector 0xff).
 * Exceptions from CPL3: the first on this CPU redirects the iret frame to
 * the Rust handler user_fault(vector, error, rip, cr2, cpu) on this CPU's
 * fault stack and marks the CPU as in its fault path (fault_active[cpu],
 * cleared by the Rust side when it is done); a fault while that mark is
 * set ends the run (fatal_nested).
 * Exceptions from CPL0: triple fault (the VMM sees a reset).
 */
isr_common:
    push %rax
    mov 8(%rsp), %rax
    lock incq irq_counts(,%rax,8)
    cmp $32, %rax
    jb 2f
    cmp $0xff, %rax
    je 1f
    mov $LAPIC_EOI, %eax
    movl $0, (%rax)
1:  pop %rax
    add $16, %rsp
    iretq
2:  testb $3, 32(%rsp)
    jz 3f
    mov %rax, %rdi
    mov 24(%rsp), %rdx
    call cpu_index
    cmp $MAX_CPUS, %eax
    jae fatal_nested
    lea fault_active(%rip), %rcx
    cmpb $0, (%rcx,%rax)
    jne fatal_nested
    movb $1, (%rcx,%rax)
    mov %rax, %r8
    mov 16(%rsp), %rsi
    mov %cr2, %rcx
    /* fault stack top, 16-aligned minus 8 as at a function's entry */
    lea bsp_fstack+BSP_FSTACK_SIZE-8(%rip), %rax
    test %r8, %r8
    jz 4f
    mov %r8, %rax
    shl $12, %rax
    lea ap_fstacks-8(%rip), %r9
    add %r9, %rax
4:  mov %rax, 48(%rsp)
    lea user_fault(%rip), %rax
    mov %rax, 24(%rsp)
    andq $-513, 40(%rsp)
    add $24, %rsp
    iretq
3:  lidt null_idtr(%rip)
    ud2

/* CPL3: continue at RDX with RSI as the stack, RDI as the argument. */
.global switch_stack
switch_stack:
    mov %rsi, %rsp
    jmp *%rdx

.popsection

/* ---------------------------------------------------------------- data */
.pushsection .rodata.probe, "a"
.balign 8
svc_table:
    .quad svc_cpuid, svc_cr3, svc_rdmsr, cpl0_reset, svc_wait_irq
    .quad svc_outb, svc_inb, svc_sti, svc_cli, svc_write, svc_cpu
    .quad svc_wrmsr
msg_nested:
    .ascii "PROBE FATAL fault in the failure path vector="
msg_nested_end:
msg_rip:
    .ascii " rip="
msg_rip_end:
.popsection

.pushsection .data.probe, "aw"
.balign 16
.global gdt
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08 kernel code 64 */
    .quad 0x00cf92000000ffff    /* 0x10 kernel data */
    .quad 0x00cff2000000ffff    /* 0x18 user data */
    .quad 0x00affa000000ffff    /* 0x20 user code 64 */
    .quad 0x00cf9a000000ffff    /* 0x28 kernel code 32 */
    .quad 0
    .fill MAX_CPUS * 2, 8, 0    /* 0x38: TSS descriptors */
gdt_end:

.balign 16
    .word 0, 0, 0
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
.balign 16
    .word 0, 0, 0
idtr:
    .word 256 * 16 - 1
    .quad idt
.balign 16
    .word 0, 0, 0
null_idtr:
    .word 0
    .quad 0

/* Identity map 0-4 GiB with 2 MiB user pages; 3-4 GiB uncached. */
.balign 4096
.global pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
.global pdpt
pdpt:
    .quad pd_low + 0x7
    .quad pd_low + 0x1000 + 0x7
    .quad pd_low + 0x2000 + 0x7
    .quad pd_low + 0x3000 + 0x7
    .fill 508, 8, 0
.global pd_low
pd_low:
.set pde, 0
.rept 2048
    .if pde >= 1536
    .quad (pde << 21) | 0x9f
    .else
    .quad (pde << 21) | 0x87
    .endif
    .set pde, pde + 1
.endr
.popsection

.pushsection .bss.probe, "aw", @nobits
.balign 4096
.global pd_pool
pd_pool:
    .skip 60 * 4096
.global kstacks
kstacks:
    .skip MAX_CPUS * KSTACK_SIZE
.balign 16
.global idt
idt:
    .skip 256 * 16
.global tss_array
tss_array:
    .skip MAX_CPUS * TSS_STRIDE
.global irq_counts
irq_counts:
    .skip 256 * 8
/* kind, reg, cs, rflags, tsc, cr0, cr4, efer */
.global entry_state
entry_state:
    .skip 64
/* cpu, kstack top, ustack top, tss selector */
.global ap_boot
ap_boot:
    .skip 32
/* 1 while a CPU runs its fault handler (see isr_common) */
.global fault_active
fault_active:
    .skip MAX_CPUS
/* Page table that maps the stack region in 4 KiB pages (paging.rs). */
.balign 4096
.global stacks_pt
stacks_pt:
    .skip 4096
.popsection

/*
 * User and fault stacks, in one 2 MiB-aligned region (link.ld) that
 * paging.rs maps in 4 KiB pages with the guard pages left out, so that a
 * stack that overflows faults instead of writing over its neighbour (and
 * nothing below the region is reachable from a stack at all).
 */
.pushsection .stacks, "aw", @nobits
.global stacks_region
stacks_region:
.global stack_guard0
stack_guard0:
    .skip GUARD_SIZE
.global bsp_ustack
bsp_ustack:
    .skip BSP_USTACK_SIZE
.global bsp_ustack_top
bsp_ustack_top:
.global stack_guard1
stack_guard1:
    .skip GUARD_SIZE
.global bsp_fstack
bsp_fstack:
    .skip BSP_FSTACK_SIZE
.global stack_guard2
stack_guard2:
    .skip GUARD_SIZE
/* CPU i >= 1 uses the 4 KiB from ap_fstacks + (i - 1) * 4 KiB */
.global ap_fstacks
ap_fstacks:
    .skip (MAX_CPUS - 1) * AP_FSTACK_SIZE
.global stack_guard3
stack_guard3:
    .skip GUARD_SIZE
.global ap_ustacks
ap_ustacks:
    .skip MAX_CPUS * AP_USTACK_SIZE
.global stacks_region_end
stacks_region_end:
.popsection
