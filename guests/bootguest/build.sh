#!/bin/sh
# Build the bootguest Multiboot kernel: build.sh OUTDIR  ->  OUTDIR/bootguest.elf (32-bit ELF)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# 64-bit object (the code switches to long mode itself), linked as x86-64 and then
# converted to a 32-bit ELF because QEMU's Multiboot loader only accepts ELF32.
as --64 -o "$tmp/bootguest.o" "$here/bootguest.S"
ld -m elf_x86_64 -nostdlib -z max-page-size=0x1000 -T "$here/link.ld" \
   -o "$tmp/bootguest64.elf" "$tmp/bootguest.o"
objcopy -O elf32-i386 "$tmp/bootguest64.elf" "$out/bootguest.elf"
echo "$out/bootguest.elf"
