# A NixOS VM test (nixosTests style) of the module's unit as NixOS runs it, with
# every hardening flag (ProtectProc=invisible included, which a container cannot
# run with PrivateUsers: see tests/test_nixos_unit.py) and the nginx front:
# an image pulled through nginx, the unit's stop timeout, kill mode and file
# limit, `systemd-analyze security`, and a journal free of denials.
# Run with nixpkgs:  nix build .#checks.x86_64-linux.nixos-hardening -L
# Here (no nixpkgs) tests/test_nix_packaging.py evaluates it with stand-ins.
{ pkgs, module, package, pkgsPath }:
pkgs.testers.runNixOSTest {
  name = "nixery-hardening";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [ module ];
      services.nixery = {
        enable = true;
        inherit package pkgsPath;
        nixTimeout = 120;
        nginx.enable = true;
        nginx.virtualHost = "localhost";
      };
      environment.systemPackages = [
        pkgs.skopeo
        pkgs.umoci
      ];
      virtualisation.memorySize = 2048;
    };

  testScript = ''
    import re

    machine.wait_for_unit("nixery.service")
    machine.wait_for_unit("nginx.service")
    machine.wait_for_open_port(80)

    # Through nginx, which Nixery (on 127.0.0.1:8080) trusts to name the client.
    machine.succeed(
        "skopeo --insecure-policy copy --src-tls-verify=false docker://localhost/hello:latest oci:/tmp/hello:latest"
    )
    machine.succeed("umoci unpack --image /tmp/hello:latest /tmp/bundle")
    machine.succeed("ls /tmp/bundle/rootfs/nix/store/*-hello-tiny/bin/hello")

    shown = machine.succeed("systemctl show nixery.service -p LimitNOFILE -p KillMode -p TimeoutStopUSec -p User")
    for expected in ("LimitNOFILE=65536", "KillMode=mixed", "TimeoutStopUSec=2min 30s", "User=nixery"):
        assert expected in shown, shown

    overall = machine.succeed("systemd-analyze security --no-pager nixery.service | tail -1")
    exposure = float(re.search(r"exposure level for nixery.service: ([\d.]+)", overall).group(1))
    assert exposure <= 2.5, overall

    journal = machine.succeed("journalctl -u nixery.service -o cat --no-pager")
    # ProcSubset=pid hides /proc/stat from the Nix client's garbage collector: harmless.
    journal = journal.replace("GC Warning: Could not open /proc/stat", "")
    denied = [
        line for line in journal.splitlines()
        if re.search(r"permission denied|operation not permitted|read-only file system|could not open|SECCOMP|status=2\d\d/", line, re.I)
    ]
    assert not denied, denied
  '';
}
