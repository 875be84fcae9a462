//! Direct 64-bit Linux boot: kernel and initramfs loading, boot_params, E820.
