# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_executor_global_optspecs
    string join \n h/help V/version
end

function __fish_executor_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_executor_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_executor_using_subcommand
    set -l cmd (__fish_executor_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c executor -n "__fish_executor_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c executor -n "__fish_executor_needs_command" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_needs_command" -f -a "image" -d 'Manage the local image store (import, build, list, remove)'
complete -c executor -n "__fish_executor_needs_command" -f -a "queue" -d 'The coordinator: serve the job queue, or talk to its admin API'
complete -c executor -n "__fish_executor_needs_command" -f -a "generate-docs" -d 'Write the man pages and shell completions generated from these definitions'
complete -c executor -n "__fish_executor_needs_command" -f -a "dequeue" -d 'Take one job from the coordinator and write its new run document (exit 4: no job)'
complete -c executor -n "__fish_executor_needs_command" -f -a "prepare-workspace" -d 'Create the job\'s workspace: repository, files, one script per step'
complete -c executor -n "__fish_executor_needs_command" -f -a "vm-boot" -d 'Start the job\'s sandbox with the chosen runtime and record it in the document'
complete -c executor -n "__fish_executor_needs_command" -f -a "run-steps" -d 'Run the job\'s steps in its sandbox, streaming each as a log entry'
complete -c executor -n "__fish_executor_needs_command" -f -a "upload" -d 'Pack the job\'s artifacts into a tar.gz and send them to the coordinator'
complete -c executor -n "__fish_executor_needs_command" -f -a "complete" -d 'Report the outcome, tear down the sandbox and delete the workspace (safe to run twice)'
complete -c executor -n "__fish_executor_needs_command" -f -a "loop" -d 'Run jobs continuously: the stages in-process, with heartbeats, cancellation and draining'
complete -c executor -n "__fish_executor_needs_command" -f -a "run" -d 'Run jobs continuously: the stages in-process, with heartbeats, cancellation and draining'
complete -c executor -n "__fish_executor_needs_command" -f -a "validate" -d 'Check the configuration, the coordinator\'s acceptance of the secret and the runtime\'s tools'
complete -c executor -n "__fish_executor_needs_command" -f -a "janitor" -d 'Remove workspaces and sandboxes that no live job owns (one pass)'
complete -c executor -n "__fish_executor_needs_command" -f -a "install" -d 'Install what a runtime needs on this host'
complete -c executor -n "__fish_executor_needs_command" -f -a "test-vm" -d 'Boot a microVM, run a command in it and print the phases of the boot with their times'
complete -c executor -n "__fish_executor_needs_command" -f -a "cache" -d 'Manage the host\'s dependency caches (list, remove, prune, verify)'
complete -c executor -n "__fish_executor_needs_command" -f -a "debug" -d 'A shell in the sandbox kept for a failed job on this host (EXECUTOR_KEEP_FAILED)'
complete -c executor -n "__fish_executor_needs_command" -f -a "network-resolver" -d 'Serve one allowlist job\'s DNS (started and stopped by the job\'s network)'
complete -c executor -n "__fish_executor_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c executor -n "__fish_executor_using_subcommand image; and not __fish_seen_subcommand_from import build-base build-busybox pull ls rm prune help" -l state-dir -d 'State directory; the store is its images/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand image; and not __fish_seen_subcommand_from import build-base build-busybox pull ls rm prune help" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand image; and not __fish_seen_subcommand_from import build-base build-busybox pull ls rm prune help" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand image; and not __fish_seen_subcommand_from import build-base build-busybox pull ls rm prune help" -f -a "import" -d 'Import a `docker save` or OCI image-layout tarball as NAME'
complete -c executor -n "__fish_executor_using_subcommand image; and not __fish_seen_subcommand_from import build-base build-busybox pull ls rm prune help" -f -a "build-base" -d 'Build a minimal Debian bookworm image (bash, coreutils, git, ca-certificates) with debootstrap'
complete -c executor -n "__fish_executor_using_subcommand image; and not __fish_seen_subcommand_from import build-base build-busybox pull ls rm prune help" -f -a "build-busybox" -d 'Build a tiny image from the host\'s static busybox, plus git and the libraries it links'
complete -c executor -n "__fish_executor_using_subcommand image; and not __fish_seen_subcommand_from import build-base build-busybox pull ls rm prune help" -f -a "pull" -d 'Pull an image from a registry over the OCI distribution protocol'
complete -c executor -n "__fish_executor_using_subcommand image; and not __fish_seen_subcommand_from import build-base build-busybox pull ls rm prune help" -f -a "ls" -d 'List the images in the store'
complete -c executor -n "__fish_executor_using_subcommand image; and not __fish_seen_subcommand_from import build-base build-busybox pull ls rm prune help" -f -a "rm" -d 'Remove an image name; its tree goes once no name and no live sandbox uses it'
complete -c executor -n "__fish_executor_using_subcommand image; and not __fish_seen_subcommand_from import build-base build-busybox pull ls rm prune help" -f -a "prune" -d 'Remove what no one needs, then least recently used pulled images until the store fits the budget; never an image a job uses. Prints what it removed and the bytes freed'
complete -c executor -n "__fish_executor_using_subcommand image; and not __fish_seen_subcommand_from import build-base build-busybox pull ls rm prune help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from import" -l state-dir -d 'State directory; the store is its images/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from import" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from import" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from build-base" -l mirror -d 'Debian mirror for debootstrap (its default when unset)' -r
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from build-base" -l state-dir -d 'State directory; the store is its images/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from build-base" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from build-base" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from build-busybox" -l state-dir -d 'State directory; the store is its images/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from build-busybox" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from build-busybox" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from pull" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from pull" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from pull" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from pull" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from pull" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from pull" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from pull" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from pull" -l state-dir -d 'State directory; the store is its images/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from pull" -l always -d 'Download again even when the store has the reference'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from pull" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from pull" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from ls" -l state-dir -d 'State directory; the store is its images/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from ls" -l json -d 'Print JSON instead of a table'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from ls" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from ls" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from rm" -l state-dir -d 'State directory; the store is its images/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from rm" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from rm" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from prune" -l image-cache-size -d 'The budget [default: none: only unnamed trees and unneeded blobs go]' -r
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from prune" -l state-dir -d 'State directory; the store is its images/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from prune" -l dry-run -d 'Only print what would be removed'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from prune" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from prune" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from help" -f -a "import" -d 'Import a `docker save` or OCI image-layout tarball as NAME'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from help" -f -a "build-base" -d 'Build a minimal Debian bookworm image (bash, coreutils, git, ca-certificates) with debootstrap'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from help" -f -a "build-busybox" -d 'Build a tiny image from the host\'s static busybox, plus git and the libraries it links'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from help" -f -a "pull" -d 'Pull an image from a registry over the OCI distribution protocol'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from help" -f -a "ls" -d 'List the images in the store'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from help" -f -a "rm" -d 'Remove an image name; its tree goes once no name and no live sandbox uses it'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from help" -f -a "prune" -d 'Remove what no one needs, then least recently used pulled images until the store fits the budget; never an image a job uses. Prints what it removed and the bytes freed'
complete -c executor -n "__fish_executor_using_subcommand image; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "serve" -d 'Run the coordinator: the executor protocol, the admin API and /metrics, backed by SQLite or, for several replicas behind a load balancer, one PostgreSQL database (--database)'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "submit" -d 'Submit a job (the protocol\'s job JSON without id and token, plus "queue"); prints its id'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "jobs" -d 'List jobs, newest first'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "show" -d 'Show a job with its log entries'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "logs" -d 'Print a job\'s log entries; with --follow, until the job finishes'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "cancel" -d 'Cancel a job (a running one ends when its executor notices)'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "release" -d 'Release a job\'s sandbox kept for debugging (the executor does at its next heartbeat)'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "executors" -d 'List the executors that heartbeated, with their versions and whether they are active'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "queues" -d 'Each queue\'s queued jobs, oldest queued job\'s age, running jobs and executors (what an autoscaler reads from /api/queues)'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "repo" -d 'Register, list and remove the git repositories the coordinator serves to jobs'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "files" -d 'The files store jobs reference by bucket and key'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "artifacts" -d 'Download a job\'s artifacts tarball (stdout unless -o; never to a terminal)'
complete -c executor -n "__fish_executor_using_subcommand queue; and not __fish_seen_subcommand_from serve submit jobs show logs cancel release executors queues repo files artifacts help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l listen -d 'Address to listen on (port 0 picks a free port; see --addr-file)' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l data-dir -d 'Directory of the SQLite database, the artifacts and the files store (with --database: one directory every replica shares)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l database -d 'PostgreSQL database for several replicas, postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (default: SQLite in --data-dir)' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l database-password-file -d 'File holding the PostgreSQL password (instead of one in the --database URL)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l addr-file -d 'Write the base URL here (atomically) once the socket listens' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l queue -d 'A queue to serve (repeatable; replaces the default set batches, codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l stalled-max-age -d 'A processing job without a heartbeat for this long goes back to the queue' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l active-window -d 'An executor counts as active while its last heartbeat is at most this old' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l max-resets -d 'How often a stalled job is requeued before it fails' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l max-retries -d 'How often an errored job (markErrored) is retried before it fails (contract: 0)' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l log-cap-bytes -d 'Cap on a job\'s stored log output, over all its entries' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l artifact-max-bytes -d 'Cap on a job\'s artifacts upload' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l secret-file -d 'File holding the executors\' shared secret (instead of EXECUTOR_FRONTEND_PASSWORD)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l admin-token-file -d 'File holding the admin API token (instead of EXECUTOR_QUEUE_ADMIN_TOKEN)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l tls-cert -d 'PEM certificate chain: serve HTTPS' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l tls-key -d 'PEM private key of --tls-cert' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l metrics-token-file -d 'File holding a read-only token for /metrics and /api/queues, for an autoscaler (instead of EXECUTOR_QUEUE_METRICS_TOKEN; default: those need the admin token)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l dequeue-order -d 'The order of a queue\'s jobs: fair (round-robin across tenants: a job\'s "tenant", else its repository) or fifo (oldest first)' -r -f -a "fair\t''
fifo\t''"
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l tenant-max-running -d 'With the fair order, at most this many running jobs per tenant in each queue (0: no cap)' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -l keep-failed -d 'A queue\'s keep policy, QUEUE=DURATION (repeatable): its failed jobs\' sandboxes are kept for `executor debug` this long at most (0: never), within each executor\'s own EXECUTOR_KEEP_FAILED' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from serve" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from submit" -l queue -d 'Queue to submit to (overrides "queue" in the file; default batches)' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from submit" -l url -d 'Base URL of the coordinator' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from submit" -l ca-cert -d 'PEM file of the CA that signed the coordinator\'s TLS certificate (default: the web PKI)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from submit" -l json -d 'Print JSON instead of tables'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from submit" -l raw -d 'Print job-controlled text (logs, names, failure messages) as it is, control characters included, instead of escaped'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from submit" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from submit" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from jobs" -l queue -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from jobs" -l state -d 'queued, processing, completed, errored, failed or canceled' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from jobs" -l limit -d 'At most this many jobs (default 100)' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from jobs" -l url -d 'Base URL of the coordinator' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from jobs" -l ca-cert -d 'PEM file of the CA that signed the coordinator\'s TLS certificate (default: the web PKI)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from jobs" -l json -d 'Print JSON instead of tables'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from jobs" -l raw -d 'Print job-controlled text (logs, names, failure messages) as it is, control characters included, instead of escaped'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from jobs" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from jobs" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from show" -l url -d 'Base URL of the coordinator' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from show" -l ca-cert -d 'PEM file of the CA that signed the coordinator\'s TLS certificate (default: the web PKI)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from show" -l json -d 'Print JSON instead of tables'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from show" -l raw -d 'Print job-controlled text (logs, names, failure messages) as it is, control characters included, instead of escaped'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from show" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from show" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from logs" -l url -d 'Base URL of the coordinator' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from logs" -l ca-cert -d 'PEM file of the CA that signed the coordinator\'s TLS certificate (default: the web PKI)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from logs" -s f -l follow
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from logs" -l json -d 'Print JSON instead of tables'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from logs" -l raw -d 'Print job-controlled text (logs, names, failure messages) as it is, control characters included, instead of escaped'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from logs" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from logs" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from cancel" -l url -d 'Base URL of the coordinator' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from cancel" -l ca-cert -d 'PEM file of the CA that signed the coordinator\'s TLS certificate (default: the web PKI)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from cancel" -l json -d 'Print JSON instead of tables'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from cancel" -l raw -d 'Print job-controlled text (logs, names, failure messages) as it is, control characters included, instead of escaped'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from cancel" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from cancel" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from release" -l url -d 'Base URL of the coordinator' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from release" -l ca-cert -d 'PEM file of the CA that signed the coordinator\'s TLS certificate (default: the web PKI)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from release" -l json -d 'Print JSON instead of tables'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from release" -l raw -d 'Print job-controlled text (logs, names, failure messages) as it is, control characters included, instead of escaped'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from release" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from release" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from executors" -l url -d 'Base URL of the coordinator' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from executors" -l ca-cert -d 'PEM file of the CA that signed the coordinator\'s TLS certificate (default: the web PKI)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from executors" -l json -d 'Print JSON instead of tables'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from executors" -l raw -d 'Print job-controlled text (logs, names, failure messages) as it is, control characters included, instead of escaped'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from executors" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from executors" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from queues" -l url -d 'Base URL of the coordinator' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from queues" -l ca-cert -d 'PEM file of the CA that signed the coordinator\'s TLS certificate (default: the web PKI)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from queues" -l json -d 'Print JSON instead of tables'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from queues" -l raw -d 'Print job-controlled text (logs, names, failure messages) as it is, control characters included, instead of escaped'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from queues" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from queues" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from repo" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from repo" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from repo" -f -a "add" -d 'Serve the git repository at PATH (on the coordinator\'s host) as NAME'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from repo" -f -a "ls" -d 'List the served repositories'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from repo" -f -a "rm" -d 'Stop serving a repository'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from repo" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from files" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from files" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from files" -f -a "put" -d 'Store FILE as BUCKET/KEY; a job\'s files entry {"bucket", "key"} then fetches it'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from files" -f -a "ls" -d 'List the stored files'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from files" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from artifacts" -s o -l output -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from artifacts" -l url -d 'Base URL of the coordinator' -r
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from artifacts" -l ca-cert -d 'PEM file of the CA that signed the coordinator\'s TLS certificate (default: the web PKI)' -r -F
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from artifacts" -l json -d 'Print JSON instead of tables'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from artifacts" -l raw -d 'Print job-controlled text (logs, names, failure messages) as it is, control characters included, instead of escaped'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from artifacts" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from artifacts" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "serve" -d 'Run the coordinator: the executor protocol, the admin API and /metrics, backed by SQLite or, for several replicas behind a load balancer, one PostgreSQL database (--database)'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "submit" -d 'Submit a job (the protocol\'s job JSON without id and token, plus "queue"); prints its id'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "jobs" -d 'List jobs, newest first'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "show" -d 'Show a job with its log entries'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "logs" -d 'Print a job\'s log entries; with --follow, until the job finishes'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "cancel" -d 'Cancel a job (a running one ends when its executor notices)'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "release" -d 'Release a job\'s sandbox kept for debugging (the executor does at its next heartbeat)'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "executors" -d 'List the executors that heartbeated, with their versions and whether they are active'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "queues" -d 'Each queue\'s queued jobs, oldest queued job\'s age, running jobs and executors (what an autoscaler reads from /api/queues)'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "repo" -d 'Register, list and remove the git repositories the coordinator serves to jobs'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "files" -d 'The files store jobs reference by bucket and key'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "artifacts" -d 'Download a job\'s artifacts tarball (stdout unless -o; never to a terminal)'
complete -c executor -n "__fish_executor_using_subcommand queue; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c executor -n "__fish_executor_using_subcommand generate-docs" -l out -d 'Directory that receives man/, completions/ and docs/settings.md' -r -F
complete -c executor -n "__fish_executor_using_subcommand generate-docs" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand generate-docs" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand dequeue" -s o -l output -d 'Write the new run document to FILE (atomically) instead of standard output' -r -F
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l wait -d 'Wait up to DURATION for a job, with the coordinator\'s long poll where it offers one' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand dequeue" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand dequeue" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -s i -l input -d 'Read the run document from FILE instead of standard input' -r -F
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -s o -l output -d 'Write the updated run document to FILE (atomically) instead of standard output' -r -F
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand prepare-workspace" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -s i -l input -d 'Read the run document from FILE instead of standard input' -r -F
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -s o -l output -d 'Write the updated run document to FILE (atomically) instead of standard output' -r -F
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand vm-boot" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand run-steps" -s i -l input -d 'Read the run document from FILE instead of standard input' -r -F
complete -c executor -n "__fish_executor_using_subcommand run-steps" -s o -l output -d 'Write the updated run document to FILE (atomically) instead of standard output' -r -F
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand run-steps" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand run-steps" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand upload" -s i -l input -d 'Read the run document from FILE instead of standard input' -r -F
complete -c executor -n "__fish_executor_using_subcommand upload" -s o -l output -d 'Write the updated run document to FILE (atomically) instead of standard output' -r -F
complete -c executor -n "__fish_executor_using_subcommand upload" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand upload" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand upload" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand upload" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand upload" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand upload" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand upload" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand upload" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand complete" -s i -l input -d 'Read the run document from FILE instead of standard input' -r -F
complete -c executor -n "__fish_executor_using_subcommand complete" -s o -l output -d 'Write the updated run document to FILE (atomically) instead of standard output' -r -F
complete -c executor -n "__fish_executor_using_subcommand complete" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand complete" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand complete" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand complete" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand complete" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand complete" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand complete" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand complete" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand loop" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand loop" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand loop" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand loop" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand loop" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand loop" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand loop" -l verify -d 'Run `validate`\'s checks first and exit 1 when one fails, as Sourcegraph\'s `run --verify`'
complete -c executor -n "__fish_executor_using_subcommand loop" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c executor -n "__fish_executor_using_subcommand loop" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand run" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand run" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand run" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand run" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand run" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand run" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand run" -l verify -d 'Run `validate`\'s checks first and exit 1 when one fails, as Sourcegraph\'s `run --verify`'
complete -c executor -n "__fish_executor_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c executor -n "__fish_executor_using_subcommand run" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand validate" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand validate" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand validate" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand validate" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand validate" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand validate" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand validate" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand validate" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand janitor" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand janitor" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand janitor" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand janitor" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand janitor" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand janitor" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand janitor" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand janitor" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand install; and not __fish_seen_subcommand_from vm src-cli all image iptables-rules ignite cni help" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand install; and not __fish_seen_subcommand_from vm src-cli all image iptables-rules ignite cni help" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand install; and not __fish_seen_subcommand_from vm src-cli all image iptables-rules ignite cni help" -f -a "vm" -d 'Fetch the guest kernel from Debian\'s packages and build the initramfs with the guest agent'
complete -c executor -n "__fish_executor_using_subcommand install; and not __fish_seen_subcommand_from vm src-cli all image iptables-rules ignite cni help" -f -a "src-cli" -d 'Fetch Sourcegraph\'s src-cli from the instance for the guests of cliSteps jobs'
complete -c executor -n "__fish_executor_using_subcommand install; and not __fish_seen_subcommand_from vm src-cli all image iptables-rules ignite cni help" -f -a "all" -d 'Everything this host needs, as Sourcegraph\'s `install all`: the microVM guest (`install vm`), the network\'s nftables table (`install iptables-rules`) and src-cli from the instance (`install src-cli`, when EXECUTOR_FRONTEND_URL is set)'
complete -c executor -n "__fish_executor_using_subcommand install; and not __fish_seen_subcommand_from vm src-cli all image iptables-rules ignite cni help" -f -a "image" -d 'Sourcegraph\'s VM images: `executor-vm` and `kernel` are the microVM guest (`install vm`); `sandbox` has no equivalent to install'
complete -c executor -n "__fish_executor_using_subcommand install; and not __fish_seen_subcommand_from vm src-cli all image iptables-rules ignite cni help" -f -a "iptables-rules" -d 'The jobs\' network isolation: this executor\'s nftables table (Sourcegraph\'s iptables rules)'
complete -c executor -n "__fish_executor_using_subcommand install; and not __fish_seen_subcommand_from vm src-cli all image iptables-rules ignite cni help" -f -a "ignite" -d 'Sourcegraph\'s Firecracker manager: not used here (QEMU microVMs); says what replaces it'
complete -c executor -n "__fish_executor_using_subcommand install; and not __fish_seen_subcommand_from vm src-cli all image iptables-rules ignite cni help" -f -a "cni" -d 'Sourcegraph\'s CNI plugins: not used here (the executor makes each job\'s network itself)'
complete -c executor -n "__fish_executor_using_subcommand install; and not __fish_seen_subcommand_from vm src-cli all image iptables-rules ignite cni help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from vm" -l state-dir -d 'State directory (vm/ is created below it)' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from vm" -l kernel-package -d 'Kernel package: a linux-image-<version>-cloud-amd64 package or the metapackage naming one' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from vm" -l engine-mirror -d 'The Debian mirror the engine\'s packages come from' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from vm" -l force -d 'Rebuild even what is up to date'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from vm" -l engine -d 'Also build the guest\'s container engine (podman, from Debian\'s packages with debootstrap) that cliSteps jobs run `src batch exec` with'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from vm" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from vm" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from src-cli" -l state-dir -d 'State directory (vm/src-cli/ is created below it)' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from src-cli" -l frontend-url -d 'The Sourcegraph instance to fetch src from (<URL>/.api/src-cli/src_linux_amd64)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from src-cli" -l frontend-ca -d 'PEM file of CA certificates trusted for an https instance' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from src-cli" -l from -d 'Install this file as src instead of fetching it' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from src-cli" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from src-cli" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l kernel-package -d 'Kernel package of the microVM guest (as `install vm --kernel-package`)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l force -d 'Rebuild the guest even when it is up to date'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -l engine -d 'Also build the guest\'s container engine for cliSteps jobs (as `install vm --engine`)'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from all" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from image" -l state-dir -d 'State directory (vm/ is created below it)' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from image" -l kernel-package -d 'Kernel package: a linux-image-<version>-cloud-amd64 package or the metapackage naming one' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from image" -l engine-mirror -d 'The Debian mirror the engine\'s packages come from' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from image" -l force -d 'Rebuild even what is up to date'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from image" -l engine -d 'Also build the guest\'s container engine (podman, from Debian\'s packages with debootstrap) that cliSteps jobs run `src batch exec` with'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from image" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from image" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -l recreate-chain -d 'Accepted as Sourcegraph\'s flag; the table is made again whenever its layout is not this executor\'s, so there is nothing more to recreate'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from iptables-rules" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from ignite" -l bin-dir -d 'Accepted as Sourcegraph\'s flag; nothing is installed' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from ignite" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from ignite" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from cni" -l bin-dir -d 'Accepted as Sourcegraph\'s flag; nothing is installed' -r -F
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from cni" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from cni" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from help" -f -a "vm" -d 'Fetch the guest kernel from Debian\'s packages and build the initramfs with the guest agent'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from help" -f -a "src-cli" -d 'Fetch Sourcegraph\'s src-cli from the instance for the guests of cliSteps jobs'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from help" -f -a "all" -d 'Everything this host needs, as Sourcegraph\'s `install all`: the microVM guest (`install vm`), the network\'s nftables table (`install iptables-rules`) and src-cli from the instance (`install src-cli`, when EXECUTOR_FRONTEND_URL is set)'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from help" -f -a "image" -d 'Sourcegraph\'s VM images: `executor-vm` and `kernel` are the microVM guest (`install vm`); `sandbox` has no equivalent to install'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from help" -f -a "iptables-rules" -d 'The jobs\' network isolation: this executor\'s nftables table (Sourcegraph\'s iptables rules)'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from help" -f -a "ignite" -d 'Sourcegraph\'s Firecracker manager: not used here (QEMU microVMs); says what replaces it'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from help" -f -a "cni" -d 'Sourcegraph\'s CNI plugins: not used here (the executor makes each job\'s network itself)'
complete -c executor -n "__fish_executor_using_subcommand install; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c executor -n "__fish_executor_using_subcommand test-vm" -l state-dir -d 'State directory holding vm/ (see `executor install vm`)' -r -F
complete -c executor -n "__fish_executor_using_subcommand test-vm" -l accel -d 'Accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed)' -r
complete -c executor -n "__fish_executor_using_subcommand test-vm" -l timeout -d 'Seconds the boot and the command may take together' -r
complete -c executor -n "__fish_executor_using_subcommand test-vm" -l repo -d 'Clone this repository from the coordinator into the VM\'s workspace (/data, where the command then runs), as a job\'s would be; needs EXECUTOR_FRONTEND_URL and the shared secret' -r
complete -c executor -n "__fish_executor_using_subcommand test-vm" -l revision -d 'The commit (or ref) of --repo to check out' -r
complete -c executor -n "__fish_executor_using_subcommand test-vm" -l frontend-url -d 'The coordinator serving --repo' -r
complete -c executor -n "__fish_executor_using_subcommand test-vm" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator' -r -F
complete -c executor -n "__fish_executor_using_subcommand test-vm" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand test-vm" -l queue -d 'The queue whose heartbeat route registers this executor before the clone' -r
complete -c executor -n "__fish_executor_using_subcommand test-vm" -l allow-tcg -d 'Allow `--accel auto` to fall back to TCG software emulation (slow)'
complete -c executor -n "__fish_executor_using_subcommand test-vm" -l json -d 'Print the phases as one JSON object on stdout instead of text on stderr'
complete -c executor -n "__fish_executor_using_subcommand test-vm" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand test-vm" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand cache; and not __fish_seen_subcommand_from ls rm prune verify help" -l state-dir -d 'State directory; the caches are its caches/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand cache; and not __fish_seen_subcommand_from ls rm prune verify help" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand cache; and not __fish_seen_subcommand_from ls rm prune verify help" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand cache; and not __fish_seen_subcommand_from ls rm prune verify help" -f -a "ls" -d 'List every cache version, least recently used first'
complete -c executor -n "__fish_executor_using_subcommand cache; and not __fish_seen_subcommand_from ls rm prune verify help" -f -a "rm" -d 'Remove the versions of a key (a prefix of 8 or more hex digits) that no running job uses'
complete -c executor -n "__fish_executor_using_subcommand cache; and not __fish_seen_subcommand_from ls rm prune verify help" -f -a "prune" -d 'Remove replaced and corrupted versions, then the least recently used beyond the budget; never a version a running job uses'
complete -c executor -n "__fish_executor_using_subcommand cache; and not __fish_seen_subcommand_from ls rm prune verify help" -f -a "verify" -d 'Check every version\'s files against its manifest; a version that differs is a miss from then on (exit status 1 when one was found)'
complete -c executor -n "__fish_executor_using_subcommand cache; and not __fish_seen_subcommand_from ls rm prune verify help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from ls" -l state-dir -d 'State directory; the caches are its caches/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from ls" -l json -d 'Print JSON instead of a table'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from ls" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from ls" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from rm" -l state-dir -d 'State directory; the caches are its caches/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from rm" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from rm" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from prune" -l cache-size -d 'The budget [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from prune" -l state-dir -d 'State directory; the caches are its caches/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from prune" -l all -d 'Remove every version no running job uses'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from prune" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from prune" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from verify" -l state-dir -d 'State directory; the caches are its caches/ subdirectory' -r -F
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from verify" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from verify" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from help" -f -a "ls" -d 'List every cache version, least recently used first'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from help" -f -a "rm" -d 'Remove the versions of a key (a prefix of 8 or more hex digits) that no running job uses'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from help" -f -a "prune" -d 'Remove replaced and corrupted versions, then the least recently used beyond the budget; never a version a running job uses'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from help" -f -a "verify" -d 'Check every version\'s files against its manifest; a version that differs is a miss from then on (exit status 1 when one was found)'
complete -c executor -n "__fish_executor_using_subcommand cache; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c executor -n "__fish_executor_using_subcommand debug" -l command -d 'Run CMD with `/bin/sh -c` instead of an interactive shell, and exit with its status' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l frontend-url -d 'The coordinator\'s URL (scheme and host)' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l password-file -d 'Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD' -r -F
complete -c executor -n "__fish_executor_using_subcommand debug" -l frontend-ca -d 'PEM file of CA certificates trusted for an https coordinator, besides the public roots and the system trust store (SSL_CERT_FILE, SSL_CERT_DIR)' -r -F
complete -c executor -n "__fish_executor_using_subcommand debug" -l queue -d 'The queue to take jobs from (batches or codeintel)' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l queues -d 'Several queues, comma-separated (multi-queue mode)' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l poll-interval -d 'Pause between empty dequeues [default: 1s]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l max-jobs -d 'Jobs run at once by `loop` [default: 1]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l num-total-jobs -d '`loop` stops after dequeuing this many jobs (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l max-active-time -d '`loop` stops dequeuing after this long (0: no limit) [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l max-runtime -d 'Deadline of each job, from its dequeue (0: none, as in Sourcegraph\'s executor) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l cleanup-interval -d 'Period of the janitor in `loop` [default: 1m]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l keep-workspaces -d 'Keep workspaces after `complete`, for debugging' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l job-cpus -d 'CPUs of each job\'s sandbox (0: unbounded) [default: 4]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l job-memory -d 'Memory of each job\'s sandbox, like 12G (0: unbounded) [default: 12G]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l disk-space -d 'Disk space of each job\'s workspace [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l runtime -d 'Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l use-firecracker -d 'Sourcegraph\'s switch: true picks microvm, false oci, when --runtime is not given' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l vm-startup-script -d 'A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step\'s image' -r -F
complete -c executor -n "__fish_executor_using_subcommand debug" -l state-dir -d 'Where workspaces, sandboxes and images live [default: /var/lib/executor]' -r -F
complete -c executor -n "__fish_executor_using_subcommand debug" -l allow-unisolated -d 'Allow the shell runtime, which runs steps on this host without any isolation' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l vm-prefix -d 'Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l oci-runtime -d 'OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l vm-accel -d 'microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l vm-allow-tcg -d 'Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l vm-pool-size -d 'microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l vm-pool-restores -d 'How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), within the memory budget; unset or auto: the host\'s CPU count, at most 4' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l shutdown-grace -d 'After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a second signal) it stops them and exits without reporting them, so that the coordinator requeues them [default: until the jobs end]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l heartbeat-interval -d 'Heartbeat period [default: 5s]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l artifacts-max-size -d 'Largest artifact archive `upload` sends [default: 100M]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l git-timeout -d 'Limit for each git command of a clone [default: 10m]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l workspace-templates -d 'How many workspace templates (one per repository: its workspace disk right after a clean checkout, which the next job\'s disk is copied from) to keep; 0 for none [default: 8]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l image-pull -d 'When vm-boot pulls a job\'s images from their registry: missing, always or never [default: missing]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l image-cache-size -d 'The most the image store may take on disk; least recently used pulled images beyond it are removed by the janitor and `image prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l docker-auth-config -d 'Registry credentials: the content of a Docker config.json (`{"auths": {"registry": {"auth": "<base64 user:password>"}}}`); never logged' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l registry-mirror -d 'Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l insecure-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; loopback registries always may' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l private-registry -d 'Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, link-local or this host\'s addresses; pulls refuse other such destinations, as the job\'s egress policy does (insecure registries and mirrors are listed too)' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l image-pull-timeout -d 'The most one image pull may take (a job\'s own deadline stops it sooner) [default: 30m]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l registry-ca -d 'Extra CA certificates (PEM) trusted for registries\' TLS, besides the public roots and the system trust store' -r -F
complete -c executor -n "__fish_executor_using_subcommand debug" -l image-max-size -d 'The most an image\'s layers may unpack to (a decompression bomb stops here)' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l network -d 'A job\'s network: internet (public addresses through the egress policy), allowlist (only the names of EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor\'s) or none (loopback) [default: internet]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l network-cidr -d 'The pool each job\'s /30 comes from [default: 10.255.0.0/16]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l network-allow -d 'Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l dns-servers -d 'Resolvers named in a job\'s resolv.conf, comma-separated [default: the host\'s non-loopback ones]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l network-bandwidth -d 'A cap on each job\'s bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l caches -d 'Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md) [default: true]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l cache-rules -d 'A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image [default: the shipped rules for Sourcegraph\'s indexers]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l cache-size -d 'The most the dependency caches may take on disk; least recently used versions beyond it (never one a running job uses) are removed by the janitor, each save and `cache prune` [default: no budget]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l cache-trusted-queues -d 'Queues whose successful jobs save their caches whatever their commit (besides commits at the tip of their repository\'s default branch), comma-separated' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l keep-failed -d 'Keep a failed job\'s sandbox (an oci container\'s layer, a paused microVM) this long for `executor debug JOB` (network off, secrets out of its environment); 0: never. A coordinator\'s per-queue policy may shorten it [default: 0]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l keep-failed-max -d 'The most sandboxes kept for debugging at once; the oldest is released first [default: 3]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l keep-failed-disk -d 'The most disk all sandboxes kept for debugging may hold; the oldest is released first [default: 20G]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l vm-snapshots -d 'Restore the VM pool\'s VMs from a snapshot of one booted template per pool key instead of booting each (default true; false: every VM boots)' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l network-allow-hosts -d 'With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443) [default: none]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l network-dns-grace -d 'With EXECUTOR_NETWORK=allowlist, how long an answer\'s addresses stay reachable past its TTL [default: 30s]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l network-dns-rate -d 'With EXECUTOR_NETWORK=allowlist, DNS questions per second a job\'s resolver answers (a burst of as many); more are refused and logged (bounds DNS tunnelling) [default: 50]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l network-dns-max-name -d 'With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job\'s resolver forwards; longer ones are refused and logged (bounds DNS tunnelling) [default: 128]' -r
complete -c executor -n "__fish_executor_using_subcommand debug" -l list -d 'List the sandboxes kept for debugging on this host, and until when'
complete -c executor -n "__fish_executor_using_subcommand debug" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand debug" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand network-resolver" -l spare -d 'Start ahead of a job: read the configuration\'s path (a file of DIR) from stdin' -r -F
complete -c executor -n "__fish_executor_using_subcommand network-resolver" -s h -l help -d 'Print help'
complete -c executor -n "__fish_executor_using_subcommand network-resolver" -s V -l version -d 'Print version'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "image" -d 'Manage the local image store (import, build, list, remove)'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "queue" -d 'The coordinator: serve the job queue, or talk to its admin API'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "generate-docs" -d 'Write the man pages and shell completions generated from these definitions'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "dequeue" -d 'Take one job from the coordinator and write its new run document (exit 4: no job)'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "prepare-workspace" -d 'Create the job\'s workspace: repository, files, one script per step'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "vm-boot" -d 'Start the job\'s sandbox with the chosen runtime and record it in the document'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "run-steps" -d 'Run the job\'s steps in its sandbox, streaming each as a log entry'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "upload" -d 'Pack the job\'s artifacts into a tar.gz and send them to the coordinator'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "complete" -d 'Report the outcome, tear down the sandbox and delete the workspace (safe to run twice)'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "loop" -d 'Run jobs continuously: the stages in-process, with heartbeats, cancellation and draining'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "validate" -d 'Check the configuration, the coordinator\'s acceptance of the secret and the runtime\'s tools'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "janitor" -d 'Remove workspaces and sandboxes that no live job owns (one pass)'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "install" -d 'Install what a runtime needs on this host'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "test-vm" -d 'Boot a microVM, run a command in it and print the phases of the boot with their times'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "cache" -d 'Manage the host\'s dependency caches (list, remove, prune, verify)'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "debug" -d 'A shell in the sandbox kept for a failed job on this host (EXECUTOR_KEEP_FAILED)'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "network-resolver" -d 'Serve one allowlist job\'s DNS (started and stopped by the job\'s network)'
complete -c executor -n "__fish_executor_using_subcommand help; and not __fish_seen_subcommand_from image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from image" -f -a "import" -d 'Import a `docker save` or OCI image-layout tarball as NAME'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from image" -f -a "build-base" -d 'Build a minimal Debian bookworm image (bash, coreutils, git, ca-certificates) with debootstrap'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from image" -f -a "build-busybox" -d 'Build a tiny image from the host\'s static busybox, plus git and the libraries it links'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from image" -f -a "pull" -d 'Pull an image from a registry over the OCI distribution protocol'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from image" -f -a "ls" -d 'List the images in the store'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from image" -f -a "rm" -d 'Remove an image name; its tree goes once no name and no live sandbox uses it'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from image" -f -a "prune" -d 'Remove what no one needs, then least recently used pulled images until the store fits the budget; never an image a job uses. Prints what it removed and the bytes freed'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from queue" -f -a "serve" -d 'Run the coordinator: the executor protocol, the admin API and /metrics, backed by SQLite or, for several replicas behind a load balancer, one PostgreSQL database (--database)'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from queue" -f -a "submit" -d 'Submit a job (the protocol\'s job JSON without id and token, plus "queue"); prints its id'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from queue" -f -a "jobs" -d 'List jobs, newest first'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from queue" -f -a "show" -d 'Show a job with its log entries'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from queue" -f -a "logs" -d 'Print a job\'s log entries; with --follow, until the job finishes'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from queue" -f -a "cancel" -d 'Cancel a job (a running one ends when its executor notices)'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from queue" -f -a "release" -d 'Release a job\'s sandbox kept for debugging (the executor does at its next heartbeat)'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from queue" -f -a "executors" -d 'List the executors that heartbeated, with their versions and whether they are active'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from queue" -f -a "queues" -d 'Each queue\'s queued jobs, oldest queued job\'s age, running jobs and executors (what an autoscaler reads from /api/queues)'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from queue" -f -a "repo" -d 'Register, list and remove the git repositories the coordinator serves to jobs'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from queue" -f -a "files" -d 'The files store jobs reference by bucket and key'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from queue" -f -a "artifacts" -d 'Download a job\'s artifacts tarball (stdout unless -o; never to a terminal)'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from install" -f -a "vm" -d 'Fetch the guest kernel from Debian\'s packages and build the initramfs with the guest agent'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from install" -f -a "src-cli" -d 'Fetch Sourcegraph\'s src-cli from the instance for the guests of cliSteps jobs'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from install" -f -a "all" -d 'Everything this host needs, as Sourcegraph\'s `install all`: the microVM guest (`install vm`), the network\'s nftables table (`install iptables-rules`) and src-cli from the instance (`install src-cli`, when EXECUTOR_FRONTEND_URL is set)'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from install" -f -a "image" -d 'Sourcegraph\'s VM images: `executor-vm` and `kernel` are the microVM guest (`install vm`); `sandbox` has no equivalent to install'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from install" -f -a "iptables-rules" -d 'The jobs\' network isolation: this executor\'s nftables table (Sourcegraph\'s iptables rules)'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from install" -f -a "ignite" -d 'Sourcegraph\'s Firecracker manager: not used here (QEMU microVMs); says what replaces it'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from install" -f -a "cni" -d 'Sourcegraph\'s CNI plugins: not used here (the executor makes each job\'s network itself)'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from cache" -f -a "ls" -d 'List every cache version, least recently used first'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from cache" -f -a "rm" -d 'Remove the versions of a key (a prefix of 8 or more hex digits) that no running job uses'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from cache" -f -a "prune" -d 'Remove replaced and corrupted versions, then the least recently used beyond the budget; never a version a running job uses'
complete -c executor -n "__fish_executor_using_subcommand help; and __fish_seen_subcommand_from cache" -f -a "verify" -d 'Check every version\'s files against its manifest; a version that differs is a miss from then on (exit status 1 when one was found)'
