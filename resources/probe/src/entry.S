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
 * reload CR3 through the service gate (int $0x80).
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
/* CR4 = PAE | OSFXSR | OSXMMEXCPT (SSE at CPL3; no SMEP/SMAP/PGE/LA57) */
.set CR4_VALUE, 0x620
/* CR0 = PG | NE | ET | MP | PE; no EM/TS so SSE works, caches on */
.set CR0_VALUE, 0x80000033
.set USER_RFLAGS, 0x3002        /* IOPL=3, IF=0 */
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
    /* vector 0x80: the service gate, DPL3 */
    lea svc_entry(%rip), %rax
    mov %ax, idt+0x800(%rip)
    movw $0xee00, idt+0x804(%rip)
    shr $16, %rax
    mov %ax, idt+0x806(%rip)
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
 * Service gate (int $0x80 from CPL3, interrupt gate so IF=0 inside).
 * EAX = function: 0 cpuid(EDI leaf, ESI subleaf) -> EAX,EBX,ECX,EDX;
 * 1 load CR3 = RDI; 2 rdmsr(EDI) -> EDX:EAX; 3 reset (triple fault);
 * 4 sti; hlt (wait for one interrupt).
 */
svc_entry:
    cmp $1, %eax
    je 1f
    cmp $2, %eax
    je 2f
    cmp $3, %eax
    je 3f
    cmp $4, %eax
    je 4f
    mov %edi, %eax
    mov %esi, %ecx
    cpuid
    iretq
1:  mov %rdi, %cr3
    iretq
2:  mov %edi, %ecx
    rdmsr
    iretq
3:  lidt null_idtr(%rip)
    ud2
4:  sti
    hlt
    cli
    iretq

/* 256 stubs of 16 bytes: push a dummy error code if the CPU did not. */
.balign 16
isr_stubs:
.set vec, 0
.rept 256
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    push $0
    .endif
    push $vec
    jmp isr_common
    .set vec, vec + 1
.endr

/*
 * Stack: rax, vector, error, rip, cs, rflags, rsp, ss.
 * Interrupts (>= 32): count, EOI (not for the spurious vector 0xff).
 * Exceptions from CPL3: redirect the iret frame to the Rust handler
 * user_fault(vector, error, rip, cr2) below the faulting stack.
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
    mov 16(%rsp), %rsi
    mov 24(%rsp), %rdx
    mov %cr2, %rcx
    mov 48(%rsp), %rax
    sub $512, %rax
    and $-16, %rax
    sub $8, %rax
    mov %rax, 48(%rsp)
    lea user_fault(%rip), %rax
    mov %rax, 24(%rsp)
    andq $-513, 40(%rsp)
    add $24, %rsp
    iretq
3:  lidt null_idtr(%rip)
    ud2

.popsection

/* ---------------------------------------------------------------- data */
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
.global bsp_ustack
bsp_ustack:
    .skip BSP_USTACK_SIZE
.global ap_ustacks
ap_ustacks:
    .skip MAX_CPUS * AP_USTACK_SIZE
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
.popsection
