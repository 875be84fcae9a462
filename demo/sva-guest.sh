# The Linux guest's half of ./demo.sh, read by the guest from a virtio-fs share
# of this directory (vmm run --share): accel-config sets up a dedicated and a
# shared user work queue on the vDSA, and accel-config-test's dsa_test copies
# memory through each (MOVDIR64B, then ENQCMD), through SVA.
uname -sr
accel-config config-engine dsa0/engine0.0 --group-id=0
accel-config config-wq dsa0/wq0.0 --group-id=0 --mode=dedicated --type=user \
	--name=demo-dwq --priority=10 --wq-size=16 --driver-name=user
accel-config config-wq dsa0/wq0.1 --group-id=0 --mode=shared --type=user \
	--name=demo-swq --priority=10 --wq-size=16 --threshold=15 --driver-name=user
accel-config enable-device dsa0
accel-config enable-wq dsa0/wq0.0 dsa0/wq0.1
t=/usr/libexec/accel-config/test/dsa_test
$t -w 0 -l 4096 -o 3 >/dev/null &&
	echo "guest: dsa_test on the dedicated WQ (MOVDIR64B): 4 KiB memmove verified"
$t -w 1 -l 4096 -o 3 >/dev/null &&
	echo "guest: dsa_test on the shared WQ (ENQCMD): 4 KiB memmove verified"
