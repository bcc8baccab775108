-- Catching the refusal with pcall and carrying on must not work.
return { plan = function(ctx)
    pcall(string.rep, '', 1 << 40)
    pcall(table.move, {}, 1, 1 << 40, 1)
    return { ports = ctx.ports }
end }
