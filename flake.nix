{
  description = "Nixery: a container registry that builds images on demand with Nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];

      forAllSystems =
        f:
        nixpkgs.lib.genAttrs systems (
          system:
          f {
            inherit system;
            pkgs = nixpkgs.legacyPackages.${system};
          }
        );

      helper = ./nixery/nix/helper.nix;

      # Nixery's own image: Nixery with a single-user Nix inside. Builds run
      # as root without a sandbox (a sandbox would need a privileged
      # container), so the start-up script writes a nix.conf saying so, and
      # the users and directories Nix expects, unless they were mounted in.
      mkImage =
        pkgs: nixery:
        let
          start = pkgs.writeShellApplication {
            name = "nixery-container-start";
            runtimeInputs = [ pkgs.coreutils ];
            text = ''
              if [ ! -e /etc/nix/nix.conf ]; then
                mkdir -p /etc/nix
                printf '%s\n' \
                  'sandbox = false' \
                  'build-users-group =' \
                  'experimental-features = nix-command' \
                  > /etc/nix/nix.conf
              fi

              if [ ! -e /etc/passwd ]; then
                {
                  echo 'root:x:0:0:root:/root:/bin/bash'
                  for i in 1 2 3 4 5 6 7 8; do
                    echo "nixbld$i:x:$((30000 + i)):30000:Nix build user $i:/var/empty:/bin/false"
                  done
                  echo 'nobody:x:65534:65534:nobody:/var/empty:/bin/false'
                } > /etc/passwd
              fi
              if [ ! -e /etc/group ]; then
                {
                  echo 'root:x:0:'
                  echo 'nixbld:x:30000:nixbld1,nixbld2,nixbld3,nixbld4,nixbld5,nixbld6,nixbld7,nixbld8'
                  echo 'nogroup:x:65534:'
                } > /etc/group
              fi

              mkdir -p /tmp /var/tmp /var/empty /root /var/lib/nixery
              chmod 1777 /tmp /var/tmp

              exec ${pkgs.lib.getExe nixery} "$@"
            '';
          };
        in
        pkgs.dockerTools.buildLayeredImage {
          name = "nixery";
          tag = "latest";
          contents = [
            nixery
            pkgs.nix
            pkgs.git
            pkgs.cacert
            pkgs.bashInteractive
            pkgs.coreutils
            start
          ];
          # Register the image's store paths, so that the Nix inside knows
          # they are valid (and does not try to build or delete them).
          includeNixDB = true;
          config = {
            Entrypoint = [ (pkgs.lib.getExe start) ];
            Env = [
              "PATH=/bin"
              "USER=root"
              "HOME=/root"
              "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"
              "NIX_SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"
              "GIT_SSL_CAINFO=/etc/ssl/certs/ca-bundle.crt"
              "STORAGE_PATH=/var/lib/nixery/storage"
              "NIXERY_STATE_DIR=/var/lib/nixery/state"
            ];
            ExposedPorts."8080/tcp" = { };
          };
          meta = {
            description = "Container image of Nixery, with Nix";
            inherit (nixery.meta) license platforms;
          };
        };

      # A package set for tests: one package, built by a static busybox, so
      # that a VM builds it offline in a moment.
      tinyPackageSet =
        pkgs:
        pkgs.writeTextDir "default.nix" ''
          { system ? builtins.currentSystem }:
          let
            busybox = "''${builtins.storePath ${pkgs.pkgsStatic.busybox}}/bin/busybox";
          in
          {
            hello = derivation {
              name = "hello-tiny";
              inherit system;
              builder = busybox;
              args = [
                "sh"
                "-c"
                '''
                  ''${busybox} mkdir -p $out/bin
                  ''${busybox} printf '#!%s sh\necho Hello from Nixery\n' ''${busybox} > $out/bin/hello
                  ''${busybox} chmod +x $out/bin/hello
                '''
              ];
            };
          }
        '';
    in
    {
      overlays.default = final: prev: { nixery = final.callPackage ./default.nix { }; };

      packages = forAllSystems (
        { pkgs, system }:
        {
          default = pkgs.callPackage ./default.nix { };
          nixery = self.packages.${system}.default;
          image = mkImage pkgs self.packages.${system}.default;
        }
      );

      apps = forAllSystems (
        { system, ... }:
        {
          default = {
            type = "app";
            program = nixpkgs.lib.getExe self.packages.${system}.default;
            meta.description = "Run Nixery with its default configuration (see the README)";
          };
        }
      );

      # The path itself, as nixpkgs passes modules: the module system then knows
      # its file, and importing both names declares the options once.
      nixosModules.default = ./module.nix;
      nixosModules.nixery = ./module.nix;

      # Nixery's Nix helper, for building an image's contents without Nixery:
      #
      #   nixery.lib.imageContents {
      #     pkgsPath = nixpkgs;         # a directory holding a package set
      #     packages = [ "git" "htop" ];
      #     system = "x86_64-linux";    # needed in pure evaluation
      #   }
      #
      # evaluates to the list of derivations an image of those packages holds
      # (names the set lacks are left out: `resolve` says which).
      lib = {
        inherit helper;

        helperFor =
          {
            pkgsPath,
            packages,
            optional ? [ ],
            system ? builtins.currentSystem,
          }:
          import helper {
            packages = builtins.toJSON packages;
            optional = builtins.toJSON optional;
            srcType = "path";
            # The helper takes the path as a string (as the service passes it
            # with --argstr); a store path's context cannot be appended to a
            # path, and the helper imports the directory itself.
            srcArgs = builtins.unsafeDiscardStringContext (toString pkgsPath);
            inherit system;
          };

        imageContents = args: (self.lib.helperFor args).contents;
        resolve = args: (self.lib.helperFor args).resolve;
      };

      checks = forAllSystems (
        { pkgs, system }:
        {
          package = self.packages.${system}.default;

          nixos-hardening = import ./tests/nixos/hardening.nix {
            inherit pkgs;
            module = self.nixosModules.default;
            package = self.packages.${system}.default;
            pkgsPath = "${tinyPackageSet pkgs}";
          };

          nixos = pkgs.testers.runNixOSTest {
            name = "nixery";

            nodes.machine =
              { pkgs, ... }:
              {
                imports = [ self.nixosModules.default ];
                services.nixery = {
                  enable = true;
                  package = self.packages.${system}.default;
                  pkgsPath = "${tinyPackageSet pkgs}";
                };
                environment.systemPackages = [
                  pkgs.skopeo
                  pkgs.umoci
                  pkgs.curl
                ];
                virtualisation.memorySize = 2048;
              };

            testScript = ''
              import json

              machine.wait_for_unit("nixery.service")
              machine.wait_for_open_port(8080)

              image = "docker://localhost:8080/hello:latest"
              manifest = json.loads(machine.succeed(f"skopeo inspect --raw --tls-verify=false {image}"))
              assert manifest["schemaVersion"] == 2, manifest
              assert manifest["layers"], manifest
              for layer in manifest["layers"]:
                  assert layer["digest"].startswith("sha256:"), layer

              # A copy checks every blob against its digest.
              machine.succeed(
                  f"skopeo --insecure-policy copy --src-tls-verify=false {image} oci:/tmp/hello:latest"
              )
              machine.succeed("umoci unpack --image /tmp/hello:latest /tmp/bundle")
              machine.succeed("ls /tmp/bundle/rootfs/nix/store/*-hello-tiny/bin/hello")

              # An unknown package is an error, not an empty image.
              machine.fail("skopeo inspect --raw --tls-verify=false docker://localhost:8080/no-such-package:latest")

              # The service runs as its own unprivileged user.
              machine.succeed("systemctl show nixery.service -p User | grep -x User=nixery")

              # The probes a load balancer or Kubernetes uses.
              machine.succeed("curl -sf http://localhost:8080/healthz")
              machine.succeed("curl -sf http://localhost:8080/readyz")
            '';
          };
        }
      );

      devShells = forAllSystems (
        { pkgs, system }:
        let
          nixery = self.packages.${system}.default;
          # Only the busybox binary: its applets would shadow coreutils & co.
          busyboxStatic = pkgs.runCommand "busybox-static" { } ''
            mkdir -p $out/bin
            ln -s ${pkgs.pkgsStatic.busybox}/bin/busybox $out/bin/busybox
          '';
        in
        {
          # `nix develop -c pytest`: Nixery's dependencies and the tests', from the
          # package's own lists, and the programs the tests run.
          default = pkgs.mkShell {
            # The static busybox that test package sets build with.
            BUSYBOX = "${pkgs.pkgsStatic.busybox}/bin/busybox";
            packages = [
              (pkgs.python3.withPackages (ps: nixery.dependencies ps ++ nixery.testDependencies ps))
              pkgs.nix
              pkgs.git
              pkgs.skopeo
              pkgs.umoci
              pkgs.openssh # sshd for the git-over-ssh tests
              pkgs.chromium # the web page test
              pkgs.kubectl # kubectl kustomize for deploy/kubernetes
              pkgs.util-linux # unshare and mount for the binary cache test
              busyboxStatic
            ];
          };
        }
      );
    };
}
