//! Emulation of instructions the platform KVM cannot run: MOVDIR64B, ENQCMD, ENQCMDS, and a fallback for the rest.
