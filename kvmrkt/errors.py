"""The single exception tree of kvmrkt.

Role: every failure that library code reports is a ``KvmrktError`` subclass carrying a human message, an
optional hint (how to fix it) and a stable process exit code. ``kvmrkt.cli`` catches them in one place.
Trust boundary: none; messages may quote untrusted input (image names, paths), which callers keep short.

Exit codes (stable, documented in the README):
  1 generic, 2 usage/config, 3 image, 4 policy, 5 measurement, 6 SELinux, 7 pod state, 8 stage1/VM,
  9 networking, 10 integrity (the guest read image data that does not match what was measured).
Apps' own exit codes are passed through by ``kvmrkt run``; these codes apply when kvmrkt itself fails
before or around the apps, which is why ``run`` prints the error on stderr too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar


class KvmrktError(Exception):
    """Root of all kvmrkt errors."""

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        """The message, then the hint on its own line when there is one."""
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled as its class, arguments and attributes (subclasses take keyword-only arguments, which the
        default reduction loses): ``kvmrkt.host.forked`` passes a failed step's error to the parent."""
        return (_rebuilt, (type(self), self.args, self.__dict__))


def _rebuilt(cls: type[KvmrktError], args: tuple[object, ...], state: dict[str, object]) -> KvmrktError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class CommandError(KvmrktError):
    """A host program kvmrkt ran failed; carries its argv and the tail of its stderr."""

    def __init__(self, message: str, *, argv: list[str], returncode: int | None, stderr_tail: str) -> None:
        hint = f"command: {' '.join(argv)}"
        super().__init__(f"{message}\n{stderr_tail}".rstrip(), hint=hint)
        self.argv = argv
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class ConfigError(KvmrktError):
    """A bad flag, config file or missing host program."""

    exit_code = 2


class LimitError(ConfigError):
    """A pod asks for more host resources than the operator allows (``[pods]`` caps)."""


class ManifestError(KvmrktError):
    """A pod or image manifest that does not follow its schema."""

    exit_code = 2


class ImageError(KvmrktError):
    """An image problem."""

    exit_code = 3


class ImageNotFoundError(ImageError):
    """No image in the store matches the reference."""


class DigestMismatchError(ImageError):
    """Bytes on disk do not match the digest that names them."""


class LayerError(ImageError):
    """A layer tar is malformed or hostile."""


class PolicyError(KvmrktError):
    """A trust policy problem."""

    exit_code = 4


class PolicyLoadError(PolicyError):
    """A policy file is missing, unreadable or malformed (the message names the file and field)."""


class PolicyDeniedError(PolicyError):
    """The policy does not accept an image. ``reason`` is one of: rejected-scope, no-signature,
    untrusted-key, bad-signature, identity-mismatch; each has its own exit code (40-44)."""

    REASONS: ClassVar[dict[str, int]] = {
        "rejected-scope": 40, "no-signature": 41, "untrusted-key": 42, "bad-signature": 43, "identity-mismatch": 44,
    }  # fmt: skip

    def __init__(self, message: str, *, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason
        self.exit_code = self.REASONS[reason]  # type: ignore[misc]


class MeasurementError(KvmrktError):
    """The TPM or event log failed."""

    exit_code = 5


class TpmUnavailableError(MeasurementError):
    """The TPM could not be reached or refused a command."""


class AttestationError(MeasurementError):
    """Evidence failed verification; ``check`` names the first check that failed."""

    def __init__(self, message: str, *, check: str, report: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.check = check
        self.report = report


class EventLogError(MeasurementError):
    """The measurement event log is unreadable, malformed or does not replay."""


class SELinuxError(KvmrktError):
    """Labels could not be allocated or applied."""

    exit_code = 6


class PodError(KvmrktError):
    """A pod problem."""

    exit_code = 7


class PodNotFoundError(PodError):
    """No pod has that UUID (or UUID prefix)."""


class PodStateError(PodError):
    """The pod is not in a state that allows the operation."""

    def __init__(self, message: str, *, state: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.state = state


class NetworkError(KvmrktError):
    """Pod networking failed: a CNI plugin, the network namespace, the tap or the port forwards."""

    exit_code = 9


class IntegrityError(KvmrktError):
    """The guest kernel reported dm-verity corruption during the pod's life: what the apps read was not what
    was measured. Fails the run whatever the apps' exit codes (by app name) were."""

    exit_code = 10

    def __init__(self, reports: Sequence[str], exit_codes: Mapping[str, int]) -> None:
        apps = ", ".join(f"{name}={code}" for name, code in exit_codes.items())
        super().__init__(
            "INTEGRITY FAILURE: the guest read data that does not match the measured dm-verity root hash; the pod "
            f"fails whatever its apps returned ({apps}). The guest kernel reported:\n  " + "\n  ".join(reports),
            hint="an image changed on the host after it was measured: `kvmrkt image verify` rehashes and rebuilds it",
        )
        self.reports = tuple(reports)


class Stage1Error(KvmrktError):
    """The VM backend failed."""

    exit_code = 8


class AssetError(Stage1Error):
    """Guest kernel or initramfs missing, unbuilt or altered."""


class TemplateError(Stage1Error):
    """A VM template could not be built, or was refused (altered, or not kvmrkt's own)."""


class AccelError(Stage1Error):
    """The requested accelerator cannot be used on this host."""


class JailError(Stage1Error):
    """The VMM jail (unprivileged uid, mount namespace, cgroup, share access) could not be set up."""


class VMLaunchError(Stage1Error):
    """QEMU did not start, or exited before the guest reported ready."""


class BootTimeoutError(Stage1Error):
    """The guest did not report ready in time."""


class AgentError(Stage1Error):
    """The guest agent channel failed or refused a request."""
