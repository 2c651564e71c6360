#!/bin/sh
# As the official nginx image: render /etc/nginx/templates/X.template into /etc/nginx/conf.d/X, replacing
# only variables set in the environment (nginx's own $variables stay), then run the command.
set -eu
defined=$(env | cut -d= -f1 | sed 's/.*/${&}/' | tr '\n' ' ')
for template in /etc/nginx/templates/*.template; do
    [ -f "$template" ] || continue
    name=$(basename "$template" .template)
    envsubst "$defined" <"$template" >"/etc/nginx/conf.d/$name"
done
exec "$@"
