/*
 * pam_rdsiam: the PAM half of the test bed's stand-in for Aurora IAM
 * authentication. It asks PostgreSQL's PAM conversation for the password
 * (the IAM token), hands user + token to the bed's verifier over a unix
 * socket and returns its verdict. The verifier (testbed/bed.py) does the
 * SigV4 work; this module only moves bytes and fails closed.
 *
 * Built by bed.py at start (gcc -shared -fPIC ... -lpam) into the bed's
 * state directory, referenced by absolute path from /etc/pam.d/<service>:
 *
 *   auth    required  /tmp/rdsiam-bed-XXXX/pam_rdsiam.so socket=/tmp/.../verifier.sock
 *   account required  /tmp/rdsiam-bed-XXXX/pam_rdsiam.so
 *
 * Wire format to the verifier (all integers big-endian):
 *   u32 user_len, user bytes, u32 token_len, token bytes
 * Answer: one byte, 'Y' accepts; anything else (or nothing) rejects.
 *
 * Traps this module exists to avoid:
 *  - pam_exec reads the password into a PAM_MAX_RESP_SIZE (512) buffer, so
 *    a token with a session token (~1.3 KB) arrives truncated and fails.
 *    We take the response of the conversation as is, up to MAX_TOKEN.
 *  - PostgreSQL sends AuthenticationCleartextPassword only when a module
 *    prompts through the conversation; a module that never asks gets no
 *    password. We prompt with PAM_PROMPT_ECHO_OFF directly rather than via
 *    pam_get_authtok, whose length checks differ between Linux-PAM versions.
 *  - The module runs inside the PostgreSQL backend, as the `postgres` OS
 *    user, with no PATH: everything it touches must be reachable by that
 *    user by absolute path (hence /tmp, not the checkout under /root).
 *  - The backend ignores SIGPIPE today, but send(MSG_NOSIGNAL) keeps a
 *    vanished verifier from killing a backend should that ever change.
 *  - A hung verifier must not hang logins forever: socket timeouts.
 *  - sun_path is 108 bytes: keep the state directory path short.
 */
#define PAM_SM_AUTH
#define PAM_SM_ACCOUNT

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <security/pam_appl.h>
#include <security/pam_modules.h>

#define MAX_USER 1024
#define MAX_TOKEN 8192
#define IO_TIMEOUT_SECS 10

static const char *socket_arg(int argc, const char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "socket=", 7) == 0 && argv[i][7] != '\0')
            return argv[i] + 7;
    }
    return NULL;
}

static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int write_field(int fd, const char *s, size_t len)
{
    unsigned char hdr[4] = {
        (unsigned char)(len >> 24), (unsigned char)(len >> 16),
        (unsigned char)(len >> 8), (unsigned char)len,
    };
    if (write_all(fd, hdr, sizeof hdr) < 0)
        return -1;
    return write_all(fd, s, len);
}

/* Returns 1 only if the verifier explicitly said 'Y'. */
static int ask_verifier(const char *path, const char *user, const char *token)
{
    size_t user_len = strlen(user), token_len = strlen(token);
    if (user_len == 0 || user_len > MAX_USER || token_len == 0 || token_len > MAX_TOKEN)
        return 0;

    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path)
        return 0;
    strcpy(addr.sun_path, path);

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    struct timeval tv = {.tv_sec = IO_TIMEOUT_SECS, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);

    int ok = 0;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0 &&
        write_field(fd, user, user_len) == 0 &&
        write_field(fd, token, token_len) == 0) {
        unsigned char verdict = 0;
        ssize_t n;
        do {
            n = recv(fd, &verdict, 1, 0);
        } while (n < 0 && errno == EINTR);
        ok = (n == 1 && verdict == 'Y');
    }
    close(fd);
    return ok;
}

/* Asks the application (PostgreSQL) for the password; caller frees. */
static char *prompt_password(pam_handle_t *pamh)
{
    const struct pam_conv *conv = NULL;
    if (pam_get_item(pamh, PAM_CONV, (const void **)&conv) != PAM_SUCCESS ||
        conv == NULL || conv->conv == NULL)
        return NULL;

    struct pam_message msg = {.msg_style = PAM_PROMPT_ECHO_OFF, .msg = "Password: "};
    const struct pam_message *msgs[1] = {&msg};
    struct pam_response *resp = NULL;
    if (conv->conv(1, msgs, &resp, conv->appdata_ptr) != PAM_SUCCESS || resp == NULL)
        return NULL;
    /* The conversation allocates both the array and the string; we own them. */
    char *password = resp[0].resp;
    free(resp);
    return password;
}

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)flags;
    const char *path = socket_arg(argc, argv);
    const char *user = NULL;
    if (path == NULL || pam_get_user(pamh, &user, NULL) != PAM_SUCCESS || user == NULL)
        return PAM_AUTH_ERR;

    char *token = prompt_password(pamh);
    if (token == NULL)
        return PAM_AUTH_ERR;
    int ok = ask_verifier(path, user, token);
    /* The token is a live credential for 15 minutes: do not leave it in the heap. */
    explicit_bzero(token, strlen(token));
    free(token);
    return ok ? PAM_SUCCESS : PAM_AUTH_ERR;
}

PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh, (void)flags, (void)argc, (void)argv;
    return PAM_SUCCESS;
}

/* PostgreSQL runs pam_acct_mgmt after authentication: an empty account stack fails. */
PAM_EXTERN int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh, (void)flags, (void)argc, (void)argv;
    return PAM_SUCCESS;
}
