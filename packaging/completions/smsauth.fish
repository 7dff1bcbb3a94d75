# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_smsauth_global_optspecs
    string join \n config= h/help V/version
end

function __fish_smsauth_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_smsauth_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_smsauth_using_subcommand
    set -l cmd (__fish_smsauth_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c smsauth -n "__fish_smsauth_needs_command" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_needs_command" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_needs_command" -s V -l version -d 'Print version'
complete -c smsauth -n "__fish_smsauth_needs_command" -f -a "serve" -d 'Run the HTTP server (the default)'
complete -c smsauth -n "__fish_smsauth_needs_command" -f -a "user" -d 'Look at and change users (works while the server runs, through its admin socket)'
complete -c smsauth -n "__fish_smsauth_needs_command" -f -a "keys" -d 'The server\'s keys (works while the server runs, through its admin socket)'
complete -c smsauth -n "__fish_smsauth_needs_command" -f -a "backup" -d 'Write a consistent snapshot of the data dir (store and keys) to FILE (mode 0600)'
complete -c smsauth -n "__fish_smsauth_needs_command" -f -a "restore" -d 'Load a backup FILE into an empty data dir (the server must not be running)'
complete -c smsauth -n "__fish_smsauth_needs_command" -f -a "migrate" -d 'Bring the store\'s schema to this release\'s and exit (a start does this too)'
complete -c smsauth -n "__fish_smsauth_needs_command" -f -a "config" -d 'The configuration, without starting anything'
complete -c smsauth -n "__fish_smsauth_needs_command" -f -a "man" -d 'Print the man page (roff), made from this command line\'s definition'
complete -c smsauth -n "__fish_smsauth_needs_command" -f -a "completions" -d 'Print the completion script for SHELL (bash, zsh, fish, elvish or powershell)'
complete -c smsauth -n "__fish_smsauth_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c smsauth -n "__fish_smsauth_using_subcommand serve" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand serve" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and not __fish_seen_subcommand_from list show disable enable delete logout help" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and not __fish_seen_subcommand_from list show disable enable delete logout help" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and not __fish_seen_subcommand_from list show disable enable delete logout help" -f -a "list" -d 'One line per user: id, phone (masked unless --full), nickname, created, last login, disabled'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and not __fish_seen_subcommand_from list show disable enable delete logout help" -f -a "show" -d 'One user, with its login methods'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and not __fish_seen_subcommand_from list show disable enable delete logout help" -f -a "disable" -d 'Refuse the user\'s logins and sessions until enabled again'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and not __fish_seen_subcommand_from list show disable enable delete logout help" -f -a "enable" -d 'Undo disable'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and not __fish_seen_subcommand_from list show disable enable delete logout help" -f -a "delete" -d 'Remove the user and its login methods (its id is never reused)'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and not __fish_seen_subcommand_from list show disable enable delete logout help" -f -a "logout" -d 'End all of the user\'s sessions'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and not __fish_seen_subcommand_from list show disable enable delete logout help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from list" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from list" -l full -d 'Show every phone number in full (the store keeps them encrypted; this decrypts)'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from show" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from show" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from disable" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from disable" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from enable" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from enable" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from delete" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from delete" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from logout" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from logout" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from help" -f -a "list" -d 'One line per user: id, phone (masked unless --full), nickname, created, last login, disabled'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from help" -f -a "show" -d 'One user, with its login methods'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from help" -f -a "disable" -d 'Refuse the user\'s logins and sessions until enabled again'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from help" -f -a "enable" -d 'Undo disable'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from help" -f -a "delete" -d 'Remove the user and its login methods (its id is never reused)'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from help" -f -a "logout" -d 'End all of the user\'s sessions'
complete -c smsauth -n "__fish_smsauth_using_subcommand user; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and not __fish_seen_subcommand_from rotate-token-key rotate-phone-key help" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and not __fish_seen_subcommand_from rotate-token-key rotate-phone-key help" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and not __fish_seen_subcommand_from rotate-token-key rotate-phone-key help" -f -a "rotate-token-key" -d 'A new token signing key signs from now on; the old one goes on verifying until the last token it signed has expired (it stays in the JWKS until then)'
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and not __fish_seen_subcommand_from rotate-token-key rotate-phone-key help" -f -a "rotate-phone-key" -d 'Re-seal and re-index every stored phone number under the phone key in FILE, while the server runs (on every instance of a cluster, which must all read FILE at the same path). Follows the rotation until it is done; the old key may be destroyed only then. Resumable: run it again to follow it after an interruption'
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and not __fish_seen_subcommand_from rotate-token-key rotate-phone-key help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and __fish_seen_subcommand_from rotate-token-key" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and __fish_seen_subcommand_from rotate-token-key" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and __fish_seen_subcommand_from rotate-phone-key" -l new-key-file -d 'The new phone key: 32 random bytes, raw or base64, as privacy.phone_key_file' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and __fish_seen_subcommand_from rotate-phone-key" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and __fish_seen_subcommand_from rotate-phone-key" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and __fish_seen_subcommand_from help" -f -a "rotate-token-key" -d 'A new token signing key signs from now on; the old one goes on verifying until the last token it signed has expired (it stays in the JWKS until then)'
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and __fish_seen_subcommand_from help" -f -a "rotate-phone-key" -d 'Re-seal and re-index every stored phone number under the phone key in FILE, while the server runs (on every instance of a cluster, which must all read FILE at the same path). Follows the rotation until it is done; the old key may be destroyed only then. Resumable: run it again to follow it after an interruption'
complete -c smsauth -n "__fish_smsauth_using_subcommand keys; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c smsauth -n "__fish_smsauth_using_subcommand backup" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand backup" -l include-keys -d 'Put the phone key in the backup too. Without it the backup\'s phone numbers stay encrypted to whoever holds the file; restore then needs the key file'
complete -c smsauth -n "__fish_smsauth_using_subcommand backup" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand restore" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand restore" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand migrate" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand migrate" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand config; and not __fish_seen_subcommand_from check help" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand config; and not __fish_seen_subcommand_from check help" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand config; and not __fish_seen_subcommand_from check help" -f -a "check" -d 'Validate the configuration as a start would (exit 0, or 2 with the same message), and print the effective configuration, every secret masked'
complete -c smsauth -n "__fish_smsauth_using_subcommand config; and not __fish_seen_subcommand_from check help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c smsauth -n "__fish_smsauth_using_subcommand config; and __fish_seen_subcommand_from check" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand config; and __fish_seen_subcommand_from check" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand config; and __fish_seen_subcommand_from help" -f -a "check" -d 'Validate the configuration as a start would (exit 0, or 2 with the same message), and print the effective configuration, every secret masked'
complete -c smsauth -n "__fish_smsauth_using_subcommand config; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c smsauth -n "__fish_smsauth_using_subcommand man" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand man" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand completions" -l config -d 'Configuration file (TOML). Without one, embedded defaults apply' -r -F
complete -c smsauth -n "__fish_smsauth_using_subcommand completions" -s h -l help -d 'Print help'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and not __fish_seen_subcommand_from serve user keys backup restore migrate config man completions help" -f -a "serve" -d 'Run the HTTP server (the default)'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and not __fish_seen_subcommand_from serve user keys backup restore migrate config man completions help" -f -a "user" -d 'Look at and change users (works while the server runs, through its admin socket)'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and not __fish_seen_subcommand_from serve user keys backup restore migrate config man completions help" -f -a "keys" -d 'The server\'s keys (works while the server runs, through its admin socket)'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and not __fish_seen_subcommand_from serve user keys backup restore migrate config man completions help" -f -a "backup" -d 'Write a consistent snapshot of the data dir (store and keys) to FILE (mode 0600)'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and not __fish_seen_subcommand_from serve user keys backup restore migrate config man completions help" -f -a "restore" -d 'Load a backup FILE into an empty data dir (the server must not be running)'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and not __fish_seen_subcommand_from serve user keys backup restore migrate config man completions help" -f -a "migrate" -d 'Bring the store\'s schema to this release\'s and exit (a start does this too)'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and not __fish_seen_subcommand_from serve user keys backup restore migrate config man completions help" -f -a "config" -d 'The configuration, without starting anything'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and not __fish_seen_subcommand_from serve user keys backup restore migrate config man completions help" -f -a "man" -d 'Print the man page (roff), made from this command line\'s definition'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and not __fish_seen_subcommand_from serve user keys backup restore migrate config man completions help" -f -a "completions" -d 'Print the completion script for SHELL (bash, zsh, fish, elvish or powershell)'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and not __fish_seen_subcommand_from serve user keys backup restore migrate config man completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and __fish_seen_subcommand_from user" -f -a "list" -d 'One line per user: id, phone (masked unless --full), nickname, created, last login, disabled'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and __fish_seen_subcommand_from user" -f -a "show" -d 'One user, with its login methods'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and __fish_seen_subcommand_from user" -f -a "disable" -d 'Refuse the user\'s logins and sessions until enabled again'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and __fish_seen_subcommand_from user" -f -a "enable" -d 'Undo disable'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and __fish_seen_subcommand_from user" -f -a "delete" -d 'Remove the user and its login methods (its id is never reused)'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and __fish_seen_subcommand_from user" -f -a "logout" -d 'End all of the user\'s sessions'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and __fish_seen_subcommand_from keys" -f -a "rotate-token-key" -d 'A new token signing key signs from now on; the old one goes on verifying until the last token it signed has expired (it stays in the JWKS until then)'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and __fish_seen_subcommand_from keys" -f -a "rotate-phone-key" -d 'Re-seal and re-index every stored phone number under the phone key in FILE, while the server runs (on every instance of a cluster, which must all read FILE at the same path). Follows the rotation until it is done; the old key may be destroyed only then. Resumable: run it again to follow it after an interruption'
complete -c smsauth -n "__fish_smsauth_using_subcommand help; and __fish_seen_subcommand_from config" -f -a "check" -d 'Validate the configuration as a start would (exit 0, or 2 with the same message), and print the effective configuration, every secret masked'
