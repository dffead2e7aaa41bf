/* herd's dirty-memory test guest: boots under `qemu -kernel`, says so on
 * COM1, then writes a changing value into every 4 KiB page of its RAM above
 * 4 MiB, forever, so a live migration of it cannot converge. After each
 * sweep over its RAM it writes one '.' on COM1 (if the UART is free). */
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct multiboot_info {
    u32 flags;
    u32 mem_lower; /* KiB below 1 MiB */
    u32 mem_upper; /* KiB above 1 MiB */
};

#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002u
#define COM1 0x3F8
#define START (4u << 20)
#define PAGE 4096u

static inline void outb(u16 port, u8 value) { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void serial_puts(const char *s) {
    for (; *s; s++) {
        while ((inb(COM1 + 5) & 0x20) == 0) { }
        outb(COM1, (u8)*s);
    }
}

void kmain(u32 magic, const struct multiboot_info *mbi) {
    u32 top = 64u << 20;
    if (magic == MULTIBOOT_BOOTLOADER_MAGIC && (mbi->flags & 1u))
        top = (1u << 20) + mbi->mem_upper * 1024u;
    serial_puts("herd-dirty-kernel: dirtying memory\n");
    u32 n = 1;
    for (;;) {
        for (u32 addr = START; addr + PAGE <= top; addr += PAGE)
            *(volatile u32 *)addr = n;
        /* One '.' per pass over RAM, so that a test can measure the dirty
         * rate; skipped (never waited for) while the UART is busy. */
        if (inb(COM1 + 5) & 0x20)
            outb(COM1, '.');
        n = n + 1 ? n + 1 : 1;
    }
}
