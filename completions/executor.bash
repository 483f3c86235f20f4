_executor() {
    local i cur prev opts cmd
    COMPREPLY=()
    if [[ "${BASH_VERSINFO[0]}" -ge 4 ]]; then
        cur="$2"
    else
        cur="${COMP_WORDS[COMP_CWORD]}"
    fi
    prev="$3"
    cmd=""
    opts=""

    for i in "${COMP_WORDS[@]:0:COMP_CWORD}"
    do
        case "${cmd},${i}" in
            ",$1")
                cmd="executor"
                ;;
            executor,cache)
                cmd="executor__subcmd__cache"
                ;;
            executor,complete)
                cmd="executor__subcmd__complete"
                ;;
            executor,debug)
                cmd="executor__subcmd__debug"
                ;;
            executor,dequeue)
                cmd="executor__subcmd__dequeue"
                ;;
            executor,generate-docs)
                cmd="executor__subcmd__generate__subcmd__docs"
                ;;
            executor,help)
                cmd="executor__subcmd__help"
                ;;
            executor,image)
                cmd="executor__subcmd__image"
                ;;
            executor,install)
                cmd="executor__subcmd__install"
                ;;
            executor,janitor)
                cmd="executor__subcmd__janitor"
                ;;
            executor,loop)
                cmd="executor__subcmd__loop"
                ;;
            executor,network-resolver)
                cmd="executor__subcmd__network__subcmd__resolver"
                ;;
            executor,prepare-workspace)
                cmd="executor__subcmd__prepare__subcmd__workspace"
                ;;
            executor,queue)
                cmd="executor__subcmd__queue"
                ;;
            executor,run)
                cmd="executor__subcmd__loop"
                ;;
            executor,run-steps)
                cmd="executor__subcmd__run__subcmd__steps"
                ;;
            executor,test-vm)
                cmd="executor__subcmd__test__subcmd__vm"
                ;;
            executor,upload)
                cmd="executor__subcmd__upload"
                ;;
            executor,validate)
                cmd="executor__subcmd__validate"
                ;;
            executor,vm-boot)
                cmd="executor__subcmd__vm__subcmd__boot"
                ;;
            executor__subcmd__cache,help)
                cmd="executor__subcmd__cache__subcmd__help"
                ;;
            executor__subcmd__cache,ls)
                cmd="executor__subcmd__cache__subcmd__ls"
                ;;
            executor__subcmd__cache,prune)
                cmd="executor__subcmd__cache__subcmd__prune"
                ;;
            executor__subcmd__cache,rm)
                cmd="executor__subcmd__cache__subcmd__rm"
                ;;
            executor__subcmd__cache,verify)
                cmd="executor__subcmd__cache__subcmd__verify"
                ;;
            executor__subcmd__cache__subcmd__help,help)
                cmd="executor__subcmd__cache__subcmd__help__subcmd__help"
                ;;
            executor__subcmd__cache__subcmd__help,ls)
                cmd="executor__subcmd__cache__subcmd__help__subcmd__ls"
                ;;
            executor__subcmd__cache__subcmd__help,prune)
                cmd="executor__subcmd__cache__subcmd__help__subcmd__prune"
                ;;
            executor__subcmd__cache__subcmd__help,rm)
                cmd="executor__subcmd__cache__subcmd__help__subcmd__rm"
                ;;
            executor__subcmd__cache__subcmd__help,verify)
                cmd="executor__subcmd__cache__subcmd__help__subcmd__verify"
                ;;
            executor__subcmd__help,cache)
                cmd="executor__subcmd__help__subcmd__cache"
                ;;
            executor__subcmd__help,complete)
                cmd="executor__subcmd__help__subcmd__complete"
                ;;
            executor__subcmd__help,debug)
                cmd="executor__subcmd__help__subcmd__debug"
                ;;
            executor__subcmd__help,dequeue)
                cmd="executor__subcmd__help__subcmd__dequeue"
                ;;
            executor__subcmd__help,generate-docs)
                cmd="executor__subcmd__help__subcmd__generate__subcmd__docs"
                ;;
            executor__subcmd__help,help)
                cmd="executor__subcmd__help__subcmd__help"
                ;;
            executor__subcmd__help,image)
                cmd="executor__subcmd__help__subcmd__image"
                ;;
            executor__subcmd__help,install)
                cmd="executor__subcmd__help__subcmd__install"
                ;;
            executor__subcmd__help,janitor)
                cmd="executor__subcmd__help__subcmd__janitor"
                ;;
            executor__subcmd__help,loop)
                cmd="executor__subcmd__help__subcmd__loop"
                ;;
            executor__subcmd__help,network-resolver)
                cmd="executor__subcmd__help__subcmd__network__subcmd__resolver"
                ;;
            executor__subcmd__help,prepare-workspace)
                cmd="executor__subcmd__help__subcmd__prepare__subcmd__workspace"
                ;;
            executor__subcmd__help,queue)
                cmd="executor__subcmd__help__subcmd__queue"
                ;;
            executor__subcmd__help,run-steps)
                cmd="executor__subcmd__help__subcmd__run__subcmd__steps"
                ;;
            executor__subcmd__help,test-vm)
                cmd="executor__subcmd__help__subcmd__test__subcmd__vm"
                ;;
            executor__subcmd__help,upload)
                cmd="executor__subcmd__help__subcmd__upload"
                ;;
            executor__subcmd__help,validate)
                cmd="executor__subcmd__help__subcmd__validate"
                ;;
            executor__subcmd__help,vm-boot)
                cmd="executor__subcmd__help__subcmd__vm__subcmd__boot"
                ;;
            executor__subcmd__help__subcmd__cache,ls)
                cmd="executor__subcmd__help__subcmd__cache__subcmd__ls"
                ;;
            executor__subcmd__help__subcmd__cache,prune)
                cmd="executor__subcmd__help__subcmd__cache__subcmd__prune"
                ;;
            executor__subcmd__help__subcmd__cache,rm)
                cmd="executor__subcmd__help__subcmd__cache__subcmd__rm"
                ;;
            executor__subcmd__help__subcmd__cache,verify)
                cmd="executor__subcmd__help__subcmd__cache__subcmd__verify"
                ;;
            executor__subcmd__help__subcmd__image,build-base)
                cmd="executor__subcmd__help__subcmd__image__subcmd__build__subcmd__base"
                ;;
            executor__subcmd__help__subcmd__image,build-busybox)
                cmd="executor__subcmd__help__subcmd__image__subcmd__build__subcmd__busybox"
                ;;
            executor__subcmd__help__subcmd__image,import)
                cmd="executor__subcmd__help__subcmd__image__subcmd__import"
                ;;
            executor__subcmd__help__subcmd__image,ls)
                cmd="executor__subcmd__help__subcmd__image__subcmd__ls"
                ;;
            executor__subcmd__help__subcmd__image,prune)
                cmd="executor__subcmd__help__subcmd__image__subcmd__prune"
                ;;
            executor__subcmd__help__subcmd__image,pull)
                cmd="executor__subcmd__help__subcmd__image__subcmd__pull"
                ;;
            executor__subcmd__help__subcmd__image,rm)
                cmd="executor__subcmd__help__subcmd__image__subcmd__rm"
                ;;
            executor__subcmd__help__subcmd__install,all)
                cmd="executor__subcmd__help__subcmd__install__subcmd__all"
                ;;
            executor__subcmd__help__subcmd__install,cni)
                cmd="executor__subcmd__help__subcmd__install__subcmd__cni"
                ;;
            executor__subcmd__help__subcmd__install,ignite)
                cmd="executor__subcmd__help__subcmd__install__subcmd__ignite"
                ;;
            executor__subcmd__help__subcmd__install,image)
                cmd="executor__subcmd__help__subcmd__install__subcmd__image"
                ;;
            executor__subcmd__help__subcmd__install,iptables-rules)
                cmd="executor__subcmd__help__subcmd__install__subcmd__iptables__subcmd__rules"
                ;;
            executor__subcmd__help__subcmd__install,src-cli)
                cmd="executor__subcmd__help__subcmd__install__subcmd__src__subcmd__cli"
                ;;
            executor__subcmd__help__subcmd__install,vm)
                cmd="executor__subcmd__help__subcmd__install__subcmd__vm"
                ;;
            executor__subcmd__help__subcmd__queue,artifacts)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__artifacts"
                ;;
            executor__subcmd__help__subcmd__queue,cancel)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__cancel"
                ;;
            executor__subcmd__help__subcmd__queue,executors)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__executors"
                ;;
            executor__subcmd__help__subcmd__queue,files)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__files"
                ;;
            executor__subcmd__help__subcmd__queue,jobs)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__jobs"
                ;;
            executor__subcmd__help__subcmd__queue,logs)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__logs"
                ;;
            executor__subcmd__help__subcmd__queue,queues)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__queues"
                ;;
            executor__subcmd__help__subcmd__queue,release)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__release"
                ;;
            executor__subcmd__help__subcmd__queue,repo)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__repo"
                ;;
            executor__subcmd__help__subcmd__queue,serve)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__serve"
                ;;
            executor__subcmd__help__subcmd__queue,show)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__show"
                ;;
            executor__subcmd__help__subcmd__queue,submit)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__submit"
                ;;
            executor__subcmd__help__subcmd__queue__subcmd__files,ls)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__files__subcmd__ls"
                ;;
            executor__subcmd__help__subcmd__queue__subcmd__files,put)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__files__subcmd__put"
                ;;
            executor__subcmd__help__subcmd__queue__subcmd__repo,add)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__repo__subcmd__add"
                ;;
            executor__subcmd__help__subcmd__queue__subcmd__repo,ls)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__repo__subcmd__ls"
                ;;
            executor__subcmd__help__subcmd__queue__subcmd__repo,rm)
                cmd="executor__subcmd__help__subcmd__queue__subcmd__repo__subcmd__rm"
                ;;
            executor__subcmd__image,build-base)
                cmd="executor__subcmd__image__subcmd__build__subcmd__base"
                ;;
            executor__subcmd__image,build-busybox)
                cmd="executor__subcmd__image__subcmd__build__subcmd__busybox"
                ;;
            executor__subcmd__image,help)
                cmd="executor__subcmd__image__subcmd__help"
                ;;
            executor__subcmd__image,import)
                cmd="executor__subcmd__image__subcmd__import"
                ;;
            executor__subcmd__image,ls)
                cmd="executor__subcmd__image__subcmd__ls"
                ;;
            executor__subcmd__image,prune)
                cmd="executor__subcmd__image__subcmd__prune"
                ;;
            executor__subcmd__image,pull)
                cmd="executor__subcmd__image__subcmd__pull"
                ;;
            executor__subcmd__image,rm)
                cmd="executor__subcmd__image__subcmd__rm"
                ;;
            executor__subcmd__image__subcmd__help,build-base)
                cmd="executor__subcmd__image__subcmd__help__subcmd__build__subcmd__base"
                ;;
            executor__subcmd__image__subcmd__help,build-busybox)
                cmd="executor__subcmd__image__subcmd__help__subcmd__build__subcmd__busybox"
                ;;
            executor__subcmd__image__subcmd__help,help)
                cmd="executor__subcmd__image__subcmd__help__subcmd__help"
                ;;
            executor__subcmd__image__subcmd__help,import)
                cmd="executor__subcmd__image__subcmd__help__subcmd__import"
                ;;
            executor__subcmd__image__subcmd__help,ls)
                cmd="executor__subcmd__image__subcmd__help__subcmd__ls"
                ;;
            executor__subcmd__image__subcmd__help,prune)
                cmd="executor__subcmd__image__subcmd__help__subcmd__prune"
                ;;
            executor__subcmd__image__subcmd__help,pull)
                cmd="executor__subcmd__image__subcmd__help__subcmd__pull"
                ;;
            executor__subcmd__image__subcmd__help,rm)
                cmd="executor__subcmd__image__subcmd__help__subcmd__rm"
                ;;
            executor__subcmd__install,all)
                cmd="executor__subcmd__install__subcmd__all"
                ;;
            executor__subcmd__install,cni)
                cmd="executor__subcmd__install__subcmd__cni"
                ;;
            executor__subcmd__install,help)
                cmd="executor__subcmd__install__subcmd__help"
                ;;
            executor__subcmd__install,ignite)
                cmd="executor__subcmd__install__subcmd__ignite"
                ;;
            executor__subcmd__install,image)
                cmd="executor__subcmd__install__subcmd__image"
                ;;
            executor__subcmd__install,iptables-rules)
                cmd="executor__subcmd__install__subcmd__iptables__subcmd__rules"
                ;;
            executor__subcmd__install,src-cli)
                cmd="executor__subcmd__install__subcmd__src__subcmd__cli"
                ;;
            executor__subcmd__install,vm)
                cmd="executor__subcmd__install__subcmd__vm"
                ;;
            executor__subcmd__install__subcmd__help,all)
                cmd="executor__subcmd__install__subcmd__help__subcmd__all"
                ;;
            executor__subcmd__install__subcmd__help,cni)
                cmd="executor__subcmd__install__subcmd__help__subcmd__cni"
                ;;
            executor__subcmd__install__subcmd__help,help)
                cmd="executor__subcmd__install__subcmd__help__subcmd__help"
                ;;
            executor__subcmd__install__subcmd__help,ignite)
                cmd="executor__subcmd__install__subcmd__help__subcmd__ignite"
                ;;
            executor__subcmd__install__subcmd__help,image)
                cmd="executor__subcmd__install__subcmd__help__subcmd__image"
                ;;
            executor__subcmd__install__subcmd__help,iptables-rules)
                cmd="executor__subcmd__install__subcmd__help__subcmd__iptables__subcmd__rules"
                ;;
            executor__subcmd__install__subcmd__help,src-cli)
                cmd="executor__subcmd__install__subcmd__help__subcmd__src__subcmd__cli"
                ;;
            executor__subcmd__install__subcmd__help,vm)
                cmd="executor__subcmd__install__subcmd__help__subcmd__vm"
                ;;
            executor__subcmd__queue,artifacts)
                cmd="executor__subcmd__queue__subcmd__artifacts"
                ;;
            executor__subcmd__queue,cancel)
                cmd="executor__subcmd__queue__subcmd__cancel"
                ;;
            executor__subcmd__queue,executors)
                cmd="executor__subcmd__queue__subcmd__executors"
                ;;
            executor__subcmd__queue,files)
                cmd="executor__subcmd__queue__subcmd__files"
                ;;
            executor__subcmd__queue,help)
                cmd="executor__subcmd__queue__subcmd__help"
                ;;
            executor__subcmd__queue,jobs)
                cmd="executor__subcmd__queue__subcmd__jobs"
                ;;
            executor__subcmd__queue,logs)
                cmd="executor__subcmd__queue__subcmd__logs"
                ;;
            executor__subcmd__queue,queues)
                cmd="executor__subcmd__queue__subcmd__queues"
                ;;
            executor__subcmd__queue,release)
                cmd="executor__subcmd__queue__subcmd__release"
                ;;
            executor__subcmd__queue,repo)
                cmd="executor__subcmd__queue__subcmd__repo"
                ;;
            executor__subcmd__queue,serve)
                cmd="executor__subcmd__queue__subcmd__serve"
                ;;
            executor__subcmd__queue,show)
                cmd="executor__subcmd__queue__subcmd__show"
                ;;
            executor__subcmd__queue,submit)
                cmd="executor__subcmd__queue__subcmd__submit"
                ;;
            executor__subcmd__queue__subcmd__files,help)
                cmd="executor__subcmd__queue__subcmd__files__subcmd__help"
                ;;
            executor__subcmd__queue__subcmd__files,ls)
                cmd="executor__subcmd__queue__subcmd__files__subcmd__ls"
                ;;
            executor__subcmd__queue__subcmd__files,put)
                cmd="executor__subcmd__queue__subcmd__files__subcmd__put"
                ;;
            executor__subcmd__queue__subcmd__files__subcmd__help,help)
                cmd="executor__subcmd__queue__subcmd__files__subcmd__help__subcmd__help"
                ;;
            executor__subcmd__queue__subcmd__files__subcmd__help,ls)
                cmd="executor__subcmd__queue__subcmd__files__subcmd__help__subcmd__ls"
                ;;
            executor__subcmd__queue__subcmd__files__subcmd__help,put)
                cmd="executor__subcmd__queue__subcmd__files__subcmd__help__subcmd__put"
                ;;
            executor__subcmd__queue__subcmd__help,artifacts)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__artifacts"
                ;;
            executor__subcmd__queue__subcmd__help,cancel)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__cancel"
                ;;
            executor__subcmd__queue__subcmd__help,executors)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__executors"
                ;;
            executor__subcmd__queue__subcmd__help,files)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__files"
                ;;
            executor__subcmd__queue__subcmd__help,help)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__help"
                ;;
            executor__subcmd__queue__subcmd__help,jobs)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__jobs"
                ;;
            executor__subcmd__queue__subcmd__help,logs)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__logs"
                ;;
            executor__subcmd__queue__subcmd__help,queues)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__queues"
                ;;
            executor__subcmd__queue__subcmd__help,release)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__release"
                ;;
            executor__subcmd__queue__subcmd__help,repo)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__repo"
                ;;
            executor__subcmd__queue__subcmd__help,serve)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__serve"
                ;;
            executor__subcmd__queue__subcmd__help,show)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__show"
                ;;
            executor__subcmd__queue__subcmd__help,submit)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__submit"
                ;;
            executor__subcmd__queue__subcmd__help__subcmd__files,ls)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__files__subcmd__ls"
                ;;
            executor__subcmd__queue__subcmd__help__subcmd__files,put)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__files__subcmd__put"
                ;;
            executor__subcmd__queue__subcmd__help__subcmd__repo,add)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__repo__subcmd__add"
                ;;
            executor__subcmd__queue__subcmd__help__subcmd__repo,ls)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__repo__subcmd__ls"
                ;;
            executor__subcmd__queue__subcmd__help__subcmd__repo,rm)
                cmd="executor__subcmd__queue__subcmd__help__subcmd__repo__subcmd__rm"
                ;;
            executor__subcmd__queue__subcmd__repo,add)
                cmd="executor__subcmd__queue__subcmd__repo__subcmd__add"
                ;;
            executor__subcmd__queue__subcmd__repo,help)
                cmd="executor__subcmd__queue__subcmd__repo__subcmd__help"
                ;;
            executor__subcmd__queue__subcmd__repo,ls)
                cmd="executor__subcmd__queue__subcmd__repo__subcmd__ls"
                ;;
            executor__subcmd__queue__subcmd__repo,rm)
                cmd="executor__subcmd__queue__subcmd__repo__subcmd__rm"
                ;;
            executor__subcmd__queue__subcmd__repo__subcmd__help,add)
                cmd="executor__subcmd__queue__subcmd__repo__subcmd__help__subcmd__add"
                ;;
            executor__subcmd__queue__subcmd__repo__subcmd__help,help)
                cmd="executor__subcmd__queue__subcmd__repo__subcmd__help__subcmd__help"
                ;;
            executor__subcmd__queue__subcmd__repo__subcmd__help,ls)
                cmd="executor__subcmd__queue__subcmd__repo__subcmd__help__subcmd__ls"
                ;;
            executor__subcmd__queue__subcmd__repo__subcmd__help,rm)
                cmd="executor__subcmd__queue__subcmd__repo__subcmd__help__subcmd__rm"
                ;;
            *)
                ;;
        esac
    done

    case "${cmd}" in
        executor)
            opts="-h -V --help --version image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop run validate janitor install test-vm cache debug network-resolver help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 1 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__cache)
            opts="-h -V --state-dir --help --version ls rm prune verify help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__cache__subcmd__help)
            opts="ls rm prune verify help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__cache__subcmd__help__subcmd__help)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__cache__subcmd__help__subcmd__ls)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__cache__subcmd__help__subcmd__prune)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__cache__subcmd__help__subcmd__rm)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__cache__subcmd__help__subcmd__verify)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__cache__subcmd__ls)
            opts="-h -V --json --state-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__cache__subcmd__prune)
            opts="-h -V --cache-size --all --state-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__cache__subcmd__rm)
            opts="-h -V --state-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__cache__subcmd__verify)
            opts="-h -V --state-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__complete)
            opts="-i -o -h -V --input --output --frontend-url --password-file --frontend-ca --queue --queues --poll-interval --max-jobs --num-total-jobs --max-active-time --max-runtime --cleanup-interval --keep-workspaces --job-cpus --job-memory --disk-space --runtime --use-firecracker --vm-startup-script --state-dir --allow-unisolated --vm-prefix --oci-runtime --vm-accel --vm-allow-tcg --vm-pool-size --vm-pool-restores --shutdown-grace --heartbeat-interval --artifacts-max-size --git-timeout --workspace-templates --image-pull --image-cache-size --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --network --network-cidr --network-allow --dns-servers --network-bandwidth --caches --cache-rules --cache-size --cache-trusted-queues --keep-failed --keep-failed-max --keep-failed-disk --vm-snapshots --network-allow-hosts --network-dns-grace --network-dns-rate --network-dns-max-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --input)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -i)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --output)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -o)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-total-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-active-time)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cleanup-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-workspaces)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-cpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-memory)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disk-space)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --use-firecracker)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-startup-script)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allow-unisolated)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-prefix)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --oci-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-allow-tcg)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-restores)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --shutdown-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --heartbeat-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifacts-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --git-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workspace-templates)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-cidr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dns-servers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-bandwidth)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --caches)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-rules)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-trusted-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-max)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-disk)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-snapshots)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow-hosts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-max-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__debug)
            opts="-h -V --command --list --frontend-url --password-file --frontend-ca --queue --queues --poll-interval --max-jobs --num-total-jobs --max-active-time --max-runtime --cleanup-interval --keep-workspaces --job-cpus --job-memory --disk-space --runtime --use-firecracker --vm-startup-script --state-dir --allow-unisolated --vm-prefix --oci-runtime --vm-accel --vm-allow-tcg --vm-pool-size --vm-pool-restores --shutdown-grace --heartbeat-interval --artifacts-max-size --git-timeout --workspace-templates --image-pull --image-cache-size --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --network --network-cidr --network-allow --dns-servers --network-bandwidth --caches --cache-rules --cache-size --cache-trusted-queues --keep-failed --keep-failed-max --keep-failed-disk --vm-snapshots --network-allow-hosts --network-dns-grace --network-dns-rate --network-dns-max-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --command)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-total-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-active-time)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cleanup-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-workspaces)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-cpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-memory)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disk-space)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --use-firecracker)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-startup-script)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allow-unisolated)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-prefix)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --oci-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-allow-tcg)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-restores)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --shutdown-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --heartbeat-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifacts-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --git-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workspace-templates)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-cidr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dns-servers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-bandwidth)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --caches)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-rules)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-trusted-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-max)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-disk)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-snapshots)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow-hosts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-max-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__dequeue)
            opts="-o -h -V --output --wait --frontend-url --password-file --frontend-ca --queue --queues --poll-interval --max-jobs --num-total-jobs --max-active-time --max-runtime --cleanup-interval --keep-workspaces --job-cpus --job-memory --disk-space --runtime --use-firecracker --vm-startup-script --state-dir --allow-unisolated --vm-prefix --oci-runtime --vm-accel --vm-allow-tcg --vm-pool-size --vm-pool-restores --shutdown-grace --heartbeat-interval --artifacts-max-size --git-timeout --workspace-templates --image-pull --image-cache-size --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --network --network-cidr --network-allow --dns-servers --network-bandwidth --caches --cache-rules --cache-size --cache-trusted-queues --keep-failed --keep-failed-max --keep-failed-disk --vm-snapshots --network-allow-hosts --network-dns-grace --network-dns-rate --network-dns-max-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --output)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -o)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --wait)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-total-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-active-time)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cleanup-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-workspaces)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-cpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-memory)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disk-space)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --use-firecracker)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-startup-script)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allow-unisolated)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-prefix)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --oci-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-allow-tcg)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-restores)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --shutdown-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --heartbeat-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifacts-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --git-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workspace-templates)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-cidr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dns-servers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-bandwidth)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --caches)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-rules)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-trusted-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-max)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-disk)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-snapshots)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow-hosts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-max-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__generate__subcmd__docs)
            opts="-h -V --out --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --out)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help)
            opts="image queue generate-docs dequeue prepare-workspace vm-boot run-steps upload complete loop validate janitor install test-vm cache debug network-resolver help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__cache)
            opts="ls rm prune verify"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__cache__subcmd__ls)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__cache__subcmd__prune)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__cache__subcmd__rm)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__cache__subcmd__verify)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__complete)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__debug)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__dequeue)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__generate__subcmd__docs)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__help)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__image)
            opts="import build-base build-busybox pull ls rm prune"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__image__subcmd__build__subcmd__base)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__image__subcmd__build__subcmd__busybox)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__image__subcmd__import)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__image__subcmd__ls)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__image__subcmd__prune)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__image__subcmd__pull)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__image__subcmd__rm)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__install)
            opts="vm src-cli all image iptables-rules ignite cni"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__install__subcmd__all)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__install__subcmd__cni)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__install__subcmd__ignite)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__install__subcmd__image)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__install__subcmd__iptables__subcmd__rules)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__install__subcmd__src__subcmd__cli)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__install__subcmd__vm)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__janitor)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__loop)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__network__subcmd__resolver)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__prepare__subcmd__workspace)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue)
            opts="serve submit jobs show logs cancel release executors queues repo files artifacts"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__artifacts)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__cancel)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__executors)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__files)
            opts="put ls"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__files__subcmd__ls)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__files__subcmd__put)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__jobs)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__logs)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__queues)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__release)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__repo)
            opts="add ls rm"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__repo__subcmd__add)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__repo__subcmd__ls)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__repo__subcmd__rm)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__serve)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__show)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__queue__subcmd__submit)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__run__subcmd__steps)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__test__subcmd__vm)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__upload)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__validate)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__help__subcmd__vm__subcmd__boot)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image)
            opts="-h -V --state-dir --help --version import build-base build-busybox pull ls rm prune help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__build__subcmd__base)
            opts="-h -V --mirror --state-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__build__subcmd__busybox)
            opts="-h -V --state-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__help)
            opts="import build-base build-busybox pull ls rm prune help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__help__subcmd__build__subcmd__base)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__help__subcmd__build__subcmd__busybox)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__help__subcmd__help)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__help__subcmd__import)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__help__subcmd__ls)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__help__subcmd__prune)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__help__subcmd__pull)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__help__subcmd__rm)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__import)
            opts="-h -V --state-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__ls)
            opts="-h -V --json --state-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__prune)
            opts="-h -V --dry-run --image-cache-size --state-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__pull)
            opts="-h -V --always --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --state-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__image__subcmd__rm)
            opts="-h -V --state-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install)
            opts="-h -V --help --version vm src-cli all image iptables-rules ignite cni help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__all)
            opts="-h -V --kernel-package --force --engine --frontend-url --password-file --frontend-ca --queue --queues --poll-interval --max-jobs --num-total-jobs --max-active-time --max-runtime --cleanup-interval --keep-workspaces --job-cpus --job-memory --disk-space --runtime --use-firecracker --vm-startup-script --state-dir --allow-unisolated --vm-prefix --oci-runtime --vm-accel --vm-allow-tcg --vm-pool-size --vm-pool-restores --shutdown-grace --heartbeat-interval --artifacts-max-size --git-timeout --workspace-templates --image-pull --image-cache-size --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --network --network-cidr --network-allow --dns-servers --network-bandwidth --caches --cache-rules --cache-size --cache-trusted-queues --keep-failed --keep-failed-max --keep-failed-disk --vm-snapshots --network-allow-hosts --network-dns-grace --network-dns-rate --network-dns-max-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --kernel-package)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-total-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-active-time)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cleanup-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-workspaces)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-cpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-memory)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disk-space)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --use-firecracker)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-startup-script)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allow-unisolated)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-prefix)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --oci-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-allow-tcg)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-restores)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --shutdown-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --heartbeat-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifacts-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --git-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workspace-templates)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-cidr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dns-servers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-bandwidth)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --caches)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-rules)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-trusted-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-max)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-disk)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-snapshots)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow-hosts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-max-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__cni)
            opts="-h -V --bin-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --bin-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__help)
            opts="vm src-cli all image iptables-rules ignite cni help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__help__subcmd__all)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__help__subcmd__cni)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__help__subcmd__help)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__help__subcmd__ignite)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__help__subcmd__image)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__help__subcmd__iptables__subcmd__rules)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__help__subcmd__src__subcmd__cli)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__help__subcmd__vm)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__ignite)
            opts="-h -V --bin-dir --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --bin-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__image)
            opts="-h -V --state-dir --kernel-package --force --engine --engine-mirror --help --version executor-vm sandbox kernel"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kernel-package)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__iptables__subcmd__rules)
            opts="-h -V --recreate-chain --frontend-url --password-file --frontend-ca --queue --queues --poll-interval --max-jobs --num-total-jobs --max-active-time --max-runtime --cleanup-interval --keep-workspaces --job-cpus --job-memory --disk-space --runtime --use-firecracker --vm-startup-script --state-dir --allow-unisolated --vm-prefix --oci-runtime --vm-accel --vm-allow-tcg --vm-pool-size --vm-pool-restores --shutdown-grace --heartbeat-interval --artifacts-max-size --git-timeout --workspace-templates --image-pull --image-cache-size --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --network --network-cidr --network-allow --dns-servers --network-bandwidth --caches --cache-rules --cache-size --cache-trusted-queues --keep-failed --keep-failed-max --keep-failed-disk --vm-snapshots --network-allow-hosts --network-dns-grace --network-dns-rate --network-dns-max-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-total-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-active-time)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cleanup-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-workspaces)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-cpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-memory)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disk-space)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --use-firecracker)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-startup-script)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allow-unisolated)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-prefix)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --oci-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-allow-tcg)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-restores)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --shutdown-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --heartbeat-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifacts-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --git-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workspace-templates)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-cidr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dns-servers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-bandwidth)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --caches)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-rules)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-trusted-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-max)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-disk)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-snapshots)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow-hosts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-max-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__src__subcmd__cli)
            opts="-h -V --state-dir --frontend-url --frontend-ca --from --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --from)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__install__subcmd__vm)
            opts="-h -V --state-dir --kernel-package --force --engine --engine-mirror --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kernel-package)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__janitor)
            opts="-h -V --frontend-url --password-file --frontend-ca --queue --queues --poll-interval --max-jobs --num-total-jobs --max-active-time --max-runtime --cleanup-interval --keep-workspaces --job-cpus --job-memory --disk-space --runtime --use-firecracker --vm-startup-script --state-dir --allow-unisolated --vm-prefix --oci-runtime --vm-accel --vm-allow-tcg --vm-pool-size --vm-pool-restores --shutdown-grace --heartbeat-interval --artifacts-max-size --git-timeout --workspace-templates --image-pull --image-cache-size --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --network --network-cidr --network-allow --dns-servers --network-bandwidth --caches --cache-rules --cache-size --cache-trusted-queues --keep-failed --keep-failed-max --keep-failed-disk --vm-snapshots --network-allow-hosts --network-dns-grace --network-dns-rate --network-dns-max-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-total-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-active-time)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cleanup-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-workspaces)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-cpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-memory)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disk-space)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --use-firecracker)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-startup-script)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allow-unisolated)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-prefix)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --oci-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-allow-tcg)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-restores)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --shutdown-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --heartbeat-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifacts-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --git-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workspace-templates)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-cidr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dns-servers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-bandwidth)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --caches)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-rules)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-trusted-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-max)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-disk)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-snapshots)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow-hosts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-max-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__loop)
            opts="-h -V --verify --frontend-url --password-file --frontend-ca --queue --queues --poll-interval --max-jobs --num-total-jobs --max-active-time --max-runtime --cleanup-interval --keep-workspaces --job-cpus --job-memory --disk-space --runtime --use-firecracker --vm-startup-script --state-dir --allow-unisolated --vm-prefix --oci-runtime --vm-accel --vm-allow-tcg --vm-pool-size --vm-pool-restores --shutdown-grace --heartbeat-interval --artifacts-max-size --git-timeout --workspace-templates --image-pull --image-cache-size --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --network --network-cidr --network-allow --dns-servers --network-bandwidth --caches --cache-rules --cache-size --cache-trusted-queues --keep-failed --keep-failed-max --keep-failed-disk --vm-snapshots --network-allow-hosts --network-dns-grace --network-dns-rate --network-dns-max-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-total-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-active-time)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cleanup-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-workspaces)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-cpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-memory)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disk-space)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --use-firecracker)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-startup-script)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allow-unisolated)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-prefix)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --oci-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-allow-tcg)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-restores)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --shutdown-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --heartbeat-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifacts-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --git-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workspace-templates)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-cidr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dns-servers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-bandwidth)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --caches)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-rules)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-trusted-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-max)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-disk)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-snapshots)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow-hosts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-max-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__network__subcmd__resolver)
            opts="-h -V --spare --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --spare)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__prepare__subcmd__workspace)
            opts="-i -o -h -V --input --output --frontend-url --password-file --frontend-ca --queue --queues --poll-interval --max-jobs --num-total-jobs --max-active-time --max-runtime --cleanup-interval --keep-workspaces --job-cpus --job-memory --disk-space --runtime --use-firecracker --vm-startup-script --state-dir --allow-unisolated --vm-prefix --oci-runtime --vm-accel --vm-allow-tcg --vm-pool-size --vm-pool-restores --shutdown-grace --heartbeat-interval --artifacts-max-size --git-timeout --workspace-templates --image-pull --image-cache-size --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --network --network-cidr --network-allow --dns-servers --network-bandwidth --caches --cache-rules --cache-size --cache-trusted-queues --keep-failed --keep-failed-max --keep-failed-disk --vm-snapshots --network-allow-hosts --network-dns-grace --network-dns-rate --network-dns-max-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --input)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -i)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --output)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -o)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-total-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-active-time)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cleanup-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-workspaces)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-cpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-memory)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disk-space)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --use-firecracker)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-startup-script)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allow-unisolated)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-prefix)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --oci-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-allow-tcg)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-restores)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --shutdown-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --heartbeat-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifacts-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --git-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workspace-templates)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-cidr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dns-servers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-bandwidth)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --caches)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-rules)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-trusted-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-max)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-disk)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-snapshots)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow-hosts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-max-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue)
            opts="-h -V --help --version serve submit jobs show logs cancel release executors queues repo files artifacts help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__artifacts)
            opts="-o -h -V --output --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --output)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -o)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__cancel)
            opts="-h -V --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__executors)
            opts="-h -V --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__files)
            opts="-h -V --help --version put ls help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__files__subcmd__help)
            opts="put ls help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__files__subcmd__help__subcmd__help)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__files__subcmd__help__subcmd__ls)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__files__subcmd__help__subcmd__put)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__files__subcmd__ls)
            opts="-h -V --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__files__subcmd__put)
            opts="-h -V --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help)
            opts="serve submit jobs show logs cancel release executors queues repo files artifacts help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__artifacts)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__cancel)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__executors)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__files)
            opts="put ls"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__files__subcmd__ls)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__files__subcmd__put)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__help)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__jobs)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__logs)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__queues)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__release)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__repo)
            opts="add ls rm"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__repo__subcmd__add)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__repo__subcmd__ls)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__repo__subcmd__rm)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__serve)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__show)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__help__subcmd__submit)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__jobs)
            opts="-h -V --queue --state --limit --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --limit)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__logs)
            opts="-f -h -V --follow --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__queues)
            opts="-h -V --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__release)
            opts="-h -V --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__repo)
            opts="-h -V --help --version add ls rm help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__repo__subcmd__add)
            opts="-h -V --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__repo__subcmd__help)
            opts="add ls rm help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__repo__subcmd__help__subcmd__add)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__repo__subcmd__help__subcmd__help)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__repo__subcmd__help__subcmd__ls)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__repo__subcmd__help__subcmd__rm)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__repo__subcmd__ls)
            opts="-h -V --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__repo__subcmd__rm)
            opts="-h -V --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__serve)
            opts="-h -V --listen --data-dir --database --database-password-file --addr-file --queue --stalled-max-age --active-window --max-resets --max-retries --log-cap-bytes --artifact-max-bytes --secret-file --admin-token-file --tls-cert --tls-key --metrics-token-file --dequeue-order --tenant-max-running --keep-failed --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --listen)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --data-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --database)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --database-password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --addr-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --stalled-max-age)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --active-window)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-resets)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-retries)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --log-cap-bytes)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifact-max-bytes)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --secret-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --admin-token-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --tls-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --tls-key)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --metrics-token-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dequeue-order)
                    COMPREPLY=($(compgen -W "fair fifo" -- "${cur}"))
                    return 0
                    ;;
                --tenant-max-running)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__show)
            opts="-h -V --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__queue__subcmd__submit)
            opts="-h -V --queue --url --ca-cert --json --raw --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ca-cert)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__run__subcmd__steps)
            opts="-i -o -h -V --input --output --frontend-url --password-file --frontend-ca --queue --queues --poll-interval --max-jobs --num-total-jobs --max-active-time --max-runtime --cleanup-interval --keep-workspaces --job-cpus --job-memory --disk-space --runtime --use-firecracker --vm-startup-script --state-dir --allow-unisolated --vm-prefix --oci-runtime --vm-accel --vm-allow-tcg --vm-pool-size --vm-pool-restores --shutdown-grace --heartbeat-interval --artifacts-max-size --git-timeout --workspace-templates --image-pull --image-cache-size --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --network --network-cidr --network-allow --dns-servers --network-bandwidth --caches --cache-rules --cache-size --cache-trusted-queues --keep-failed --keep-failed-max --keep-failed-disk --vm-snapshots --network-allow-hosts --network-dns-grace --network-dns-rate --network-dns-max-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --input)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -i)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --output)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -o)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-total-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-active-time)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cleanup-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-workspaces)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-cpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-memory)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disk-space)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --use-firecracker)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-startup-script)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allow-unisolated)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-prefix)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --oci-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-allow-tcg)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-restores)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --shutdown-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --heartbeat-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifacts-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --git-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workspace-templates)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-cidr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dns-servers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-bandwidth)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --caches)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-rules)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-trusted-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-max)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-disk)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-snapshots)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow-hosts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-max-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__test__subcmd__vm)
            opts="-h -V --state-dir --accel --allow-tcg --timeout --json --repo --revision --frontend-url --frontend-ca --password-file --queue --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --repo)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --revision)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__upload)
            opts="-i -o -h -V --input --output --frontend-url --password-file --frontend-ca --queue --queues --poll-interval --max-jobs --num-total-jobs --max-active-time --max-runtime --cleanup-interval --keep-workspaces --job-cpus --job-memory --disk-space --runtime --use-firecracker --vm-startup-script --state-dir --allow-unisolated --vm-prefix --oci-runtime --vm-accel --vm-allow-tcg --vm-pool-size --vm-pool-restores --shutdown-grace --heartbeat-interval --artifacts-max-size --git-timeout --workspace-templates --image-pull --image-cache-size --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --network --network-cidr --network-allow --dns-servers --network-bandwidth --caches --cache-rules --cache-size --cache-trusted-queues --keep-failed --keep-failed-max --keep-failed-disk --vm-snapshots --network-allow-hosts --network-dns-grace --network-dns-rate --network-dns-max-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --input)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -i)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --output)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -o)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-total-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-active-time)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cleanup-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-workspaces)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-cpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-memory)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disk-space)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --use-firecracker)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-startup-script)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allow-unisolated)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-prefix)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --oci-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-allow-tcg)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-restores)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --shutdown-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --heartbeat-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifacts-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --git-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workspace-templates)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-cidr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dns-servers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-bandwidth)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --caches)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-rules)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-trusted-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-max)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-disk)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-snapshots)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow-hosts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-max-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__validate)
            opts="-h -V --frontend-url --password-file --frontend-ca --queue --queues --poll-interval --max-jobs --num-total-jobs --max-active-time --max-runtime --cleanup-interval --keep-workspaces --job-cpus --job-memory --disk-space --runtime --use-firecracker --vm-startup-script --state-dir --allow-unisolated --vm-prefix --oci-runtime --vm-accel --vm-allow-tcg --vm-pool-size --vm-pool-restores --shutdown-grace --heartbeat-interval --artifacts-max-size --git-timeout --workspace-templates --image-pull --image-cache-size --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --network --network-cidr --network-allow --dns-servers --network-bandwidth --caches --cache-rules --cache-size --cache-trusted-queues --keep-failed --keep-failed-max --keep-failed-disk --vm-snapshots --network-allow-hosts --network-dns-grace --network-dns-rate --network-dns-max-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-total-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-active-time)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cleanup-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-workspaces)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-cpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-memory)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disk-space)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --use-firecracker)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-startup-script)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allow-unisolated)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-prefix)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --oci-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-allow-tcg)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-restores)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --shutdown-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --heartbeat-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifacts-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --git-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workspace-templates)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-cidr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dns-servers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-bandwidth)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --caches)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-rules)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-trusted-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-max)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-disk)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-snapshots)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow-hosts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-max-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        executor__subcmd__vm__subcmd__boot)
            opts="-i -o -h -V --input --output --frontend-url --password-file --frontend-ca --queue --queues --poll-interval --max-jobs --num-total-jobs --max-active-time --max-runtime --cleanup-interval --keep-workspaces --job-cpus --job-memory --disk-space --runtime --use-firecracker --vm-startup-script --state-dir --allow-unisolated --vm-prefix --oci-runtime --vm-accel --vm-allow-tcg --vm-pool-size --vm-pool-restores --shutdown-grace --heartbeat-interval --artifacts-max-size --git-timeout --workspace-templates --image-pull --image-cache-size --docker-auth-config --registry-mirror --insecure-registry --private-registry --image-pull-timeout --registry-ca --image-max-size --network --network-cidr --network-allow --dns-servers --network-bandwidth --caches --cache-rules --cache-size --cache-trusted-queues --keep-failed --keep-failed-max --keep-failed-disk --vm-snapshots --network-allow-hosts --network-dns-grace --network-dns-rate --network-dns-max-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --input)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -i)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --output)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -o)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --password-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --frontend-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-total-jobs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-active-time)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cleanup-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-workspaces)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-cpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --job-memory)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disk-space)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --use-firecracker)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-startup-script)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --state-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allow-unisolated)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-prefix)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --oci-runtime)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-accel)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-allow-tcg)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-pool-restores)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --shutdown-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --heartbeat-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --artifacts-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --git-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workspace-templates)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --docker-auth-config)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-mirror)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --insecure-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --private-registry)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-pull-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --registry-ca)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --image-max-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-cidr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --dns-servers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-bandwidth)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --caches)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-rules)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cache-trusted-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-max)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --keep-failed-disk)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --vm-snapshots)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-allow-hosts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-grace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --network-dns-max-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
    esac
}

if [[ "${BASH_VERSINFO[0]}" -eq 4 && "${BASH_VERSINFO[1]}" -ge 4 || "${BASH_VERSINFO[0]}" -gt 4 ]]; then
    complete -F _executor -o nosort -o bashdefault -o default executor
else
    complete -F _executor -o bashdefault -o default executor
fi
