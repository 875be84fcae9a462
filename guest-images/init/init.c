// SPDX-License-Identifier: Apache-2.0
/*
 * PID 1 of the project's test guest.
 *
 * Runs one command given on the kernel command line, sends its output to the
 * virtio console (or the serial console), reports its exit status in a
 * machine-readable line (after the output, or alone on a status console of
 * its own) and powers the guest off. The protocol is described
 * in guest-images/README.md; keep both in step.
 *
 * Built static against the kernel's own nolibc (tools/include/nolibc) so that
 * no C library start-up runs: on this project's KVM every guest system call is
 * expensive, and this init makes about twenty of them in total.
 */

#include <asm/ioctls.h>
#include <asm/termbits.h>
#include <linux/reboot.h>

/* Exit status conventions shared with POSIX shells. */
#define STATUS_EXEC_FAILED 126
#define STATUS_NOT_FOUND 127
#define STATUS_SIGNAL_BASE 128

/* x86 COMMAND_LINE_SIZE is 2048; leave room for a longer one. */
#define CMDLINE_MAX 8192
#define ARGV_MAX 1024
#define ENVP_MAX 64
/* vmm.share= settings init takes; more are ignored (the VMM sends fewer). */
#define SHARES_MAX 16

/* How long to wait for a console named by vmm.out= to appear. */
#define OUT_WAIT_STEP_MS 20
#define OUT_WAIT_STEPS 500

#define TRAILER_PREFIX "\nVMM-EXIT-STATUS="
#define ERROR_PREFIX "\nVMM-INIT-ERROR="

static const char *const search_dirs[] = { "/usr/bin/", "/usr/sbin/" };
static const char fallback_path[] = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

struct settings {
	char *cmd;      /* vmm.cmd=   encoded argv, see decode_argv() */
	char *out;      /* vmm.out=   auto | console | <name under /dev> */
	char *status;   /* vmm.status= <name under /dev> | console; unset: after the output */
	char *in;       /* vmm.stdin= null | console */
	char *exit;     /* vmm.exit=  poweroff | reboot */
	char *share[SHARES_MAX]; /* vmm.share= TAG,PATH,ro|rw (PATH encoded as vmm.cmd=) */
	int shares;
	char *cwd;      /* vmm.cwd=   encoded directory the command runs in */
	int found;      /* at least one vmm.* setting seen */
};

/*
 * The status console (vmm.status=), or -1: the status line then follows the
 * command's output on the output device.
 */
static int statusfd = -1;

static char cmdline_buf[CMDLINE_MAX];
static char *cmd_argv[ARGV_MAX + 1];
static char *cmd_envp[ENVP_MAX + 2];
static char path_buf[4096];

/* ---- small output helpers (one write() per message) ---- */

struct msg {
	char buf[512];
	unsigned int len;
};

static void msg_str(struct msg *m, const char *s)
{
	while (*s && m->len < sizeof(m->buf))
		m->buf[m->len++] = *s++;
}

static void msg_int(struct msg *m, long v)
{
	char tmp[24];
	int n = 0;
	unsigned long u = v < 0 ? -(unsigned long)v : (unsigned long)v;

	if (v < 0)
		msg_str(m, "-");
	do {
		tmp[n++] = '0' + u % 10;
		u /= 10;
	} while (u);
	while (n && m->len < sizeof(m->buf))
		m->buf[m->len++] = tmp[--n];
}

static void msg_send(struct msg *m, int fd)
{
	write(fd, m->buf, m->len);
}

/* ---- settings ---- */

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

static void take_setting(struct settings *st, char *tok)
{
	if (!starts_with(tok, "vmm."))
		return;
	st->found = 1;
	if (starts_with(tok, "vmm.cmd="))
		st->cmd = tok + 8;
	else if (starts_with(tok, "vmm.out="))
		st->out = tok + 8;
	else if (starts_with(tok, "vmm.status="))
		st->status = tok + 11;
	else if (starts_with(tok, "vmm.stdin="))
		st->in = tok + 10;
	else if (starts_with(tok, "vmm.exit="))
		st->exit = tok + 9;
	else if (starts_with(tok, "vmm.share=") && st->shares < SHARES_MAX)
		st->share[st->shares++] = tok + 10;
	else if (starts_with(tok, "vmm.cwd="))
		st->cwd = tok + 8;
}

/*
 * Settings come from init's own arguments (whatever follows "--" on the kernel
 * command line: no system call needed) or, when none of those is a vmm.*
 * setting, from /proc/cmdline (the kernel drops dotted parameters before "--").
 */
static void read_settings(struct settings *st, int argc, char **argv)
{
	int i, fd, in_quote = 0;
	ssize_t n;
	char *p, *tok = 0;

	for (i = 1; i < argc; i++)
		take_setting(st, argv[i]);
	if (st->found)
		return;

	fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC, 0);
	if (fd < 0)
		return;
	n = read(fd, cmdline_buf, sizeof(cmdline_buf) - 1);
	close(fd);
	if (n <= 0)
		return;
	cmdline_buf[n] = 0;

	for (p = cmdline_buf; ; p++) {
		char c = *p;

		if (c == '"')
			in_quote = !in_quote;
		if (c == 0 || ((c == ' ' || c == '\n' || c == '\t') && !in_quote)) {
			*p = 0;
			if (tok)
				take_setting(st, tok);
			tok = 0;
			if (c == 0)
				break;
		} else if (!tok) {
			tok = p;
		}
	}
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * A list of fields separated by ',', each percent-encoded (%XX, hex digits of
 * either case); ',' and '%' inside a field must be encoded. Decodes in place
 * into fields[] (NULL-terminated, at most max fields). Returns the number of
 * fields, or -1 on bad input.
 */
static int decode_fields(char *s, char **fields, int max)
{
	int n = 0;
	char *out = s;

	fields[n++] = out;
	for (;;) {
		char c = *s++;

		if (c == 0) {
			*out = 0;
			break;
		}
		if (c == ',') {
			*out++ = 0;
			if (n == max)
				return -1;
			fields[n++] = out;
		} else if (c == '%') {
			int hi = hexval(s[0]);
			int lo = hi < 0 ? -1 : hexval(s[1]);

			if (lo < 0)
				return -1;
			*out++ = (char)(hi << 4 | lo);
			s += 2;
		} else {
			*out++ = c;
		}
	}
	fields[n] = 0;
	return n;
}

/* vmm.cmd= holds the argv as such a list. Returns argc, or -1 on bad input. */
static int decode_argv(char *s)
{
	return decode_fields(s, cmd_argv, ARGV_MAX);
}

static void build_envp(char **envp)
{
	int n = 0, have_path = 0;

	for (; envp && *envp && n < ENVP_MAX; envp++) {
		if (starts_with(*envp, "PATH="))
			have_path = 1;
		cmd_envp[n++] = *envp;
	}
	if (!have_path)
		cmd_envp[n++] = (char *)fallback_path;
	cmd_envp[n] = 0;
}

/* ---- console ---- */

/* dst = a + b; returns 0 if it does not fit. */
static int join(char *dst, size_t size, const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);

	if (la + lb >= size)
		return 0;
	memcpy(dst, a, la);
	memcpy(dst + la, b, lb + 1);
	return 1;
}

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static void make_raw(int fd)
{
	struct termios t;

	if (ioctl(fd, TCGETS, &t) < 0)
		return;
	t.c_iflag &= ~(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON);
	t.c_oflag &= ~OPOST;
	t.c_lflag &= ~(ECHO | ECHONL | ICANON | ISIG | IEXTEN);
	t.c_cflag &= ~(CSIZE | PARENB);
	t.c_cflag |= CS8;
	t.c_cc[VMIN] = 1;
	t.c_cc[VTIME] = 0;
	ioctl(fd, TCSETS, &t);
}

/*
 * Returns the descriptor for the command's output: a raw-mode virtio console
 * port, or 1 (the kernel console init inherited) when there is none.
 */
static int open_output(const char *out)
{
	int fd, i;

	if (!out || streq(out, "auto")) {
		fd = open("/dev/hvc0", O_RDWR | O_NOCTTY | O_CLOEXEC, 0);
		if (fd < 0)
			return 1;
	} else if (streq(out, "console")) {
		return 1;
	} else {
		if (out[0] == '/' || starts_with(out, "..") || !out[0])
			return -1;
		if (!join(path_buf, sizeof(path_buf), "/dev/", out))
			return -1;
		/* A multiport virtio console adds its ports asynchronously. */
		for (i = 0; ; i++) {
			fd = open(path_buf, O_RDWR | O_NOCTTY | O_CLOEXEC, 0);
			if (fd >= 0 || i == OUT_WAIT_STEPS)
				break;
			msleep(OUT_WAIT_STEP_MS);
		}
		if (fd < 0)
			return -1;
	}
	make_raw(fd);
	return fd;
}

/* ---- modules of a modular kernel ---- */

/* Written by the VMM into an appended initramfs: module paths in load order. */
#define MODULE_ORDER "/lib/modules/vmm/order"
static char module_list[8192];

/*
 * Loads the modules the VMM carried in (virtio-pci, virtio-console, virtio-fs
 * and their dependencies for a kernel that has them as modules). A failure is
 * told on the kernel console; the missing device is then reported as usual.
 */
static void load_modules(void)
{
	char *line, *next;
	ssize_t n;
	int fd = open(MODULE_ORDER, O_RDONLY | O_CLOEXEC, 0);

	if (fd < 0)
		return;
	n = read(fd, module_list, sizeof(module_list) - 1);
	close(fd);
	if (n <= 0)
		return;
	module_list[n] = 0;
	for (line = module_list; *line; line = next) {
		struct msg m = { .len = 0 };
		long ret;

		next = strchr(line, '\n');
		if (next)
			*next++ = 0;
		else
			next = line + strlen(line);
		if (!*line)
			continue;
		fd = open(line, O_RDONLY | O_CLOEXEC, 0);
		ret = fd < 0 ? -errno : my_syscall3(__NR_finit_module, fd, "", 0);
		if (fd >= 0)
			close(fd);
		if (ret == 0 || ret == -EEXIST)
			continue;
		msg_str(&m, "init: cannot load module ");
		msg_str(&m, line);
		msg_str(&m, ": errno ");
		msg_int(&m, -ret);
		msg_str(&m, "\n");
		msg_send(&m, 1);
	}
}

/* ---- shared host directories (virtio-fs) ---- */

static void report_error(int outfd, const char *what);
static void finish(int outfd, const char *exit_mode);

/* mkdir -p: every missing directory of the absolute path. */
static int make_dirs(char *path)
{
	char *p;

	for (p = path + 1; ; p++) {
		if (*p == '/' || *p == 0) {
			char c = *p;

			*p = 0;
			if (mkdir(path, 0755) < 0 && errno != EEXIST) {
				*p = c;
				return -1;
			}
			*p = c;
			if (c == 0)
				return 0;
		}
	}
}

/*
 * Mounts one vmm.share=TAG,PATH,ro|rw. Returns 0, or the errno; *what names
 * the step that failed.
 */
static int mount_share(char *setting, char **tag, char **path, const char **what)
{
	char *fields[4];
	unsigned long flags;

	*tag = *path = "?";
	*what = "bad-vmm.share";
	if (decode_fields(setting, fields, 3) != 3 || fields[1][0] != '/')
		return EINVAL;
	*tag = fields[0];
	*path = fields[1];
	if (streq(fields[2], "ro"))
		flags = MS_RDONLY;
	else if (streq(fields[2], "rw"))
		flags = 0;
	else
		return EINVAL;
	*what = "mkdir";
	if (make_dirs(*path) < 0)
		return errno;
	*what = "mount";
	if (mount(*tag, *path, "virtiofs", flags, 0) < 0)
		return errno;
	return 0;
}

/* Mounts every share; on failure reports it and powers off. */
static void mount_shares(struct settings *st, int outfd)
{
	int i, err;

	for (i = 0; i < st->shares; i++) {
		struct msg m = { .len = 0 };
		const char *what;
		char *tag, *path;

		err = mount_share(st->share[i], &tag, &path, &what);
		if (!err)
			continue;
		msg_str(&m, "share-mount-failed tag=");
		msg_str(&m, tag);
		msg_str(&m, " path=");
		msg_str(&m, path);
		msg_str(&m, " step=");
		msg_str(&m, what);
		msg_str(&m, " errno=");
		msg_int(&m, err);
		m.buf[m.len < sizeof(m.buf) ? m.len : sizeof(m.buf) - 1] = 0;
		report_error(outfd, m.buf);
		finish(outfd, st->exit);
	}
}

/* ---- running the command ---- */

static void exec_command(char **argv)
{
	const char *name = argv[0];
	unsigned int i;

	if (strchr(name, '/')) {
		execve(name, argv, cmd_envp);
		return;
	}
	for (i = 0; i < sizeof(search_dirs) / sizeof(search_dirs[0]); i++) {
		if (!join(path_buf, sizeof(path_buf), search_dirs[i], name))
			return;
		execve(path_buf, argv, cmd_envp);
		if (errno != ENOENT)
			return;
	}
}

static void child(int outfd, int stdin_console)
{
	struct msg m = { .len = 0 };
	int fd;

	setsid();
	if (stdin_console) {
		/* Interactive use: the console becomes the controlling terminal. */
		if (outfd != 1)
			ioctl(outfd, TIOCSCTTY, (void *)0);
		dup2(outfd, 0);
	} else {
		fd = open("/dev/null", O_RDONLY | O_CLOEXEC, 0);
		if (fd >= 0)
			dup2(fd, 0);
	}
	if (outfd != 1) {
		dup2(outfd, 1);
		dup2(outfd, 2);
	}
	exec_command(cmd_argv);

	msg_str(&m, "init: cannot execute ");
	msg_str(&m, cmd_argv[0]);
	msg_str(&m, ": errno ");
	msg_int(&m, errno);
	msg_str(&m, "\n");
	msg_send(&m, 2);
	exit(errno == ENOENT ? STATUS_NOT_FOUND : STATUS_EXEC_FAILED);
}

static int run(int outfd, int stdin_console)
{
	int status = 0;
	pid_t pid, got;

	pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0)
		child(outfd, stdin_console);

	/* PID 1 also reaps orphans; stop when the command itself has ended. */
	do {
		got = wait4(-1, &status, 0, 0);
	} while (got != pid && !(got < 0 && errno != EINTR));
	if (got != pid)
		return -1;
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	return STATUS_SIGNAL_BASE + WTERMSIG(status);
}

static void finish(int outfd, const char *exit_mode)
{
	/* tcdrain: the host must see the status line before the power goes off. */
	ioctl(outfd, TCSBRK, (void *)1);
	if (statusfd >= 0)
		ioctl(statusfd, TCSBRK, (void *)1);
	if (exit_mode && streq(exit_mode, "reboot"))
		reboot(LINUX_REBOOT_CMD_RESTART);
	else
		reboot(LINUX_REBOOT_CMD_POWER_OFF);
	/* Only reached if the kernel refused: exiting PID 1 panics the guest. */
	exit(1);
}

/*
 * Sends a status line: to the status console if there is one (after the
 * command's output has left the output device), else after the output.
 */
static void send_status(struct msg *m, int outfd)
{
	if (statusfd >= 0) {
		ioctl(outfd, TCSBRK, (void *)1);
		msg_send(m, statusfd);
	} else {
		msg_send(m, outfd);
	}
}

static void report_error(int outfd, const char *what)
{
	struct msg m = { .len = 0 };

	int target = statusfd >= 0 ? statusfd : outfd < 0 ? 1 : outfd;

	msg_str(&m, ERROR_PREFIX);
	msg_str(&m, what);
	msg_str(&m, "\n");
	send_status(&m, outfd < 0 ? 1 : outfd);
	/* For people reading the kernel console. */
	if (target > 1)
		msg_send(&m, 1);
}

int main(int argc, char **argv, char **envp)
{
	struct settings st = { 0 };
	struct msg m = { .len = 0 };
	int outfd, code, stdin_console;

	mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
	mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
	mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");

	load_modules();
	read_settings(&st, argc, argv);

	if (st.status) {
		statusfd = open_output(st.status);
		if (statusfd < 0) {
			report_error(-1, "no-status-device");
			finish(1, st.exit);
		}
	}
	outfd = open_output(st.out);
	if (outfd < 0) {
		report_error(-1, "no-output-device");
		finish(1, st.exit);
	}
	if (!st.cmd || !st.cmd[0]) {
		report_error(outfd, "no-vmm.cmd");
		finish(outfd, st.exit);
	}
	if (decode_argv(st.cmd) < 0) {
		report_error(outfd, "bad-vmm.cmd-encoding");
		finish(outfd, st.exit);
	}
	build_envp(envp);
	mount_shares(&st, outfd);
	if (st.cwd) {
		char *dir[2];

		if (decode_fields(st.cwd, dir, 1) != 1 || chdir(dir[0]) < 0) {
			report_error(outfd, "bad-vmm.cwd");
			finish(outfd, st.exit);
		}
	}

	stdin_console = st.in && streq(st.in, "console");
	code = run(outfd, stdin_console);
	if (stdin_console && outfd != 1) {
		/*
		 * The command's session leader exiting hung up its controlling
		 * terminal, and with it our descriptor: open the port again.
		 */
		close(outfd);
		outfd = open_output(st.out);
		if (outfd < 0)
			outfd = 1;
	}
	if (code < 0) {
		report_error(outfd, "fork-or-wait-failed");
		finish(outfd, st.exit);
	}

	msg_str(&m, TRAILER_PREFIX);
	msg_int(&m, code);
	msg_str(&m, "\n");
	send_status(&m, outfd);
	if (outfd != 1) {
		/* For people reading the kernel console; not part of the protocol. */
		m.len = 0;
		msg_str(&m, "init: vmm.cmd exited with status ");
		msg_int(&m, code);
		msg_str(&m, "\n");
		msg_send(&m, 1);
	}
	finish(outfd, st.exit);
	return 0;
}
